"""Configuration of the cross-layer parameter sharing family (``model_type = "recurrent_stacking"``).

Papers:
- Dabre & Fujita, "Recurrent Stacking of Layers for Compact Neural Machine Translation Models",
  AAAI 2019; journal version with transfer learning and distillation, arXiv 2106.10002.
- Takase & Kiyono, "Lessons on Parameter Sharing across Layers in Transformers", arXiv 2104.06022
  (the ``sequence``, ``cycle`` and ``cycle_rev`` schedules).

What changes: only seam 1, the execution plan. Each stack keeps its depth (``encoder_layers`` /
``decoder_layers`` = number of steps executed) but holds ``encoder_unique_layers`` /
``decoder_unique_layers`` parameter blocks; ``sharing.execution_plan`` says which block runs at
each step. A block is a whole layer, its LayerNorms included; the embeddings, their LayerNorm and
the final stack LayerNorm are outside the blocks and stay unshared, as in the papers.

Both numbers are plain config fields, so a saved ``config.json`` states the effective depth and the
number of unique layers of each stack. The family default is recurrent stacking (one block per
stack); ``"none"`` is refused here because a model without sharing is the vanilla
``fusion_transformer`` family.
"""

from __future__ import annotations

from .configuration_fusion_transformer import FusionTransformerConfig, check_choice

SHARING_STRATEGIES = ("recurrent", "sequence", "cycle", "cycle_rev")


class RecurrentStackingConfig(FusionTransformerConfig):
    r"""Configuration of [`RecurrentStackingModel`]: a FusionTransformer whose layers share parameters.

    Accepts every [`FusionTransformerConfig`] field. Differences:

    Args:
        sharing_strategy: ``"recurrent"`` (default: one block reused at every step, Dabre & Fujita),
            ``"sequence"``, ``"cycle"`` or ``"cycle_rev"`` (Takase & Kiyono).
        encoder_unique_layers / decoder_unique_layers: Parameter blocks per stack; ``None`` means 1
            for ``"recurrent"`` and must be set for the other strategies. Must lie in
            ``1..depth`` and give a schedule that runs every block (e.g. ``sequence`` needs a
            divisor of the depth).

    Example: Takase & Kiyono's best table entry, 18 encoder steps over 6 blocks::

        RecurrentStackingConfig(sharing_strategy="cycle_rev", encoder_layers=18, encoder_unique_layers=6,
                                decoder_layers=18, decoder_unique_layers=6)
    """

    model_type = "recurrent_stacking"

    sharing_strategy: str = "recurrent"

    def validate_fields(self) -> None:
        check_choice(type(self).__name__, "sharing_strategy", self.sharing_strategy, SHARING_STRATEGIES)
        super().validate_fields()


__all__ = ["SHARING_STRATEGIES", "RecurrentStackingConfig"]
