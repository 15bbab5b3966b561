"""Cross-layer parameter sharing: recurrent stacking and Takase & Kiyono's schedules.

Papers: Dabre & Fujita, AAAI 2019 / arXiv 2106.10002 (recurrent stacking, transfer learning and
distillation for it); Takase & Kiyono, arXiv 2104.06022 (``sequence``, ``cycle``, ``cycle_rev``).

What changes: nothing in the model code. The core's encoder and decoder already build one layer
module per *parameter block* and run the config's execution plan (seam 1,
``sharing.execution_plan``), writing the key/value cache of each *step* to its own slot. This file
only binds the family config, so that ``model_type = "recurrent_stacking"`` loads through the Auto
classes and saved checkpoints carry the family name. Consequences of the design, checked by the
tests:

- a shared block is one module, hence one tensor per parameter: ``num_parameters()`` counts it
  once and ``model.safetensors`` stores it once; its gradient is the sum over the steps that run it;
- decoder step ``i`` caches into slot ``i`` even when it shares weights with step ``j``.

Deviations from the papers: none in the computation. Transfer learning from a vanilla model
(``hf_fusion.transfer``) and knowledge distillation (``training.distill``) are training-time
tools and live outside the model folder.
"""

from __future__ import annotations

from .configuration_recurrent_stacking import RecurrentStackingConfig
from .modeling_fusion_transformer import FusionTransformerForConditionalGeneration, FusionTransformerModel


class RecurrentStackingModel(FusionTransformerModel):
    """The shared-layer encoder-decoder without an output head."""

    config_class = RecurrentStackingConfig


class RecurrentStackingForConditionalGeneration(FusionTransformerForConditionalGeneration):
    """The shared-layer seq2seq model with its LM head, for ``Seq2SeqTrainer`` and ``generate``."""

    config_class = RecurrentStackingConfig


__all__ = ["RecurrentStackingForConditionalGeneration", "RecurrentStackingModel"]
