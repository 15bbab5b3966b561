"""Configuration of the SurfaceFusion family (``model_type = "surface_fusion"``).

Paper: Liu et al., "Understanding and Improving Encoder Layer Fusion in Sequence-to-Sequence
Learning", ICLR 2021, arXiv 2012.14768. The model is the core Transformer with the SurfaceFusion
output head (seam 4, ``output_head="surface_fusion"``, implemented in ``surface_fusion.py``); the
head's fields (``surface_fusion_*``) live in the base config so that any family can use the head.
This config only fixes the head, so everything else composes: SurfaceFusion on a recurrently
stacked model is ``SurfaceFusionConfig(sharing_strategy="recurrent")``.
"""

from __future__ import annotations

from .configuration_fusion_transformer import FusionTransformerConfig, check_choice


class SurfaceFusionConfig(FusionTransformerConfig):
    r"""Configuration of [`SurfaceFusionForConditionalGeneration`]: a FusionTransformer whose output
    softmax also reads the source embeddings.

    Accepts every [`FusionTransformerConfig`] field; ``output_head`` must be ``"surface_fusion"``.
    The head's fields and their paper defaults:

    Args:
        surface_fusion_mode: ``"hard"`` (default) or ``"soft"`` fusion.
        surface_fusion_lambda: Target weight of hard fusion, 0.8 by default; ``None`` learns a gate.
        surface_fusion_tau: Source temperature of soft fusion, 1.0 by default.
        surface_fusion_heads: Heads of the surface attention, 1 by default.
        surface_fusion_ffn: The shared residual ReLU FFN on both paths, on by default.

    The reference recipe (WMT16 En-Ro, about 35.1 BLEU) is a post-norm Transformer-base with
    sinusoidal positions, scaled embeddings shared by encoder, decoder and output, ReLU, dropout 0.3
    and label smoothing 0.1, e.g.::

        SurfaceFusionConfig(
            d_model=512, encoder_layers=6, decoder_layers=6, encoder_attention_heads=8,
            decoder_attention_heads=8, encoder_ffn_dim=2048, decoder_ffn_dim=2048,
            activation_function="relu", dropout=0.3, attention_dropout=0.1, label_smoothing=0.1,
            scale_embedding=True, position_embedding_type="sinusoidal", layernorm_embedding=False,
        )

    trained with Adam (0.9, 0.98), lr 5e-4 inverse-sqrt with 4k warmup, and decoded with beam 4.
    """

    model_type = "surface_fusion"

    output_head: str = "surface_fusion"

    def validate_fields(self) -> None:
        check_choice(type(self).__name__, "output_head", self.output_head, ("surface_fusion",))
        super().validate_fields()


__all__ = ["SurfaceFusionConfig"]
