"""SurfaceFusion (Liu et al., ICLR 2021, arXiv 2012.14768): the source embeddings feed the softmax.

What changes: only seam 4, the output head (``surface_fusion.SurfaceFusionHead``, chosen by the
config's ``output_head="surface_fusion"``); encoder, decoder and the other seams are the core's.
This file binds the family config so that ``model_type = "surface_fusion"`` loads through the Auto
classes and saved checkpoints carry the family name. The head's equations, loss, generation
behaviour, cache slot and deviations from the reference code are documented in
``surface_fusion.py``.
"""

from __future__ import annotations

from .configuration_surface_fusion import SurfaceFusionConfig
from .modeling_fusion_transformer import FusionTransformerForConditionalGeneration, FusionTransformerModel


class SurfaceFusionModel(FusionTransformerModel):
    """The encoder-decoder without an output head (the head is where SurfaceFusion acts)."""

    config_class = SurfaceFusionConfig


class SurfaceFusionForConditionalGeneration(FusionTransformerForConditionalGeneration):
    """The seq2seq model with the SurfaceFusion head, for ``Seq2SeqTrainer`` and ``generate``.

    ``logits`` are SurfaceFusion's log P (float32): in hard mode the unnormalised mixture
    lam * log p_tgt + (1 - lam) * log p_src, which ``generate`` renormalises (greedy decoding equals
    the reference's; beam scores are log_softmax of the mixture). ``loss_terms`` holds ``ce_tgt`` and
    ``ce_src``.
    """

    config_class = SurfaceFusionConfig


__all__ = ["SurfaceFusionModel", "SurfaceFusionForConditionalGeneration"]
