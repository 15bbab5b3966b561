"""Configuration of the EncoderFusion family: the decoder (or every layer) reads all encoder layers.

``fusion_mode`` picks one of three published ways of fusing layers and maps it onto a seam key of
the core config; everything else is the core's, so a mode combines with every core option and
with other families' seams (e.g. ``sharing_strategy="recurrent"`` with ``"fine_grained"``, or
``fusion_mode="dlcl"`` together with ``encoder_memory="fine_grained"``):

    fusion_mode     seam key                          paper
    transparent     encoder_memory = "transparent"    Bapna et al., EMNLP 2018 (arXiv 1808.07561)
    fine_grained    encoder_memory = "fine_grained"   Liu et al., ICLR 2021 (arXiv 2012.14768)
    dlcl            depth_connection = "dlcl"         Wang et al., ACL 2019 (arXiv 1906.01787)

The fusion hyperparameters (``fusion_dropout``, ``fusion_embedding_layer_norm``) are core fields of
the encoder-memory seam, with per-mode defaults documented in [`FusionTransformerConfig`].
"""

from __future__ import annotations

from .configuration_fusion_transformer import FusionTransformerConfig, check_choice

# fusion_mode -> (the seam field it sets, the value it sets it to)
FUSION_MODES: dict[str, tuple[str, str]] = {
    "transparent": ("encoder_memory", "transparent"),
    "fine_grained": ("encoder_memory", "fine_grained"),
    "dlcl": ("depth_connection", "dlcl"),
}


class EncoderFusionConfig(FusionTransformerConfig):
    r"""Configuration of [`EncoderFusionModel`] / [`EncoderFusionForConditionalGeneration`].

    Args:
        fusion_mode: ``"fine_grained"`` (default: the paper-named "EncoderFusion", per-dimension
            layer attention), ``"transparent"`` (scalar layer attention) or ``"dlcl"`` (dynamic
            linear combination of layers inside encoder and decoder). It owns the seam field it
            maps to: leaving that field unset or giving the same value is fine, any other value
            (the core default included) is refused.
        **kwargs: Every [`FusionTransformerConfig`] field.

    Example:
        ```python
        >>> from hf_fusion import EncoderFusionConfig, EncoderFusionForConditionalGeneration
        >>> config = EncoderFusionConfig(fusion_mode="transparent", encoder_layers=12)
        >>> model = EncoderFusionForConditionalGeneration(config)
        >>> model.fusion_weights()["encoder_memory"].shape  # (decoder layers, encoder layers + 1)
        torch.Size([6, 13])
        ```
    """

    model_type = "encoder_fusion"

    fusion_mode: str = "fine_grained"
    # Left unset (None), these seam fields are filled in from fusion_mode; set explicitly, they must
    # agree with it, so that an explicit choice is never silently rewritten.
    encoder_memory: str | None = None
    depth_connection: str | None = None

    def validate_fields(self) -> None:
        """Map ``fusion_mode`` onto its seam field, then validate every core field."""
        name = type(self).__name__
        check_choice(name, "fusion_mode", self.fusion_mode, FUSION_MODES)
        owned, value = FUSION_MODES[self.fusion_mode]
        current = getattr(self, owned)
        if current not in (None, value):
            raise ValueError(
                f"{name}.{owned} = {current!r} contradicts fusion_mode = {self.fusion_mode!r}, which sets "
                f"{owned} = {value!r}; allowed {owned}: {value!r} or unset (or pick another fusion_mode)."
            )
        setattr(self, owned, value)
        for field in ("encoder_memory", "depth_connection"):
            if getattr(self, field) is None:
                setattr(self, field, FusionTransformerConfig.__dataclass_fields__[field].default)
        super().validate_fields()


__all__ = ["EncoderFusionConfig", "FUSION_MODES"]
