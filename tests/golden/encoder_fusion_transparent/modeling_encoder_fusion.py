"""EncoderFusion models: the core Transformer with a layer-fusing seam chosen by ``fusion_mode``.

Papers: Bapna et al., EMNLP 2018, transparent attention (arXiv 1808.07561); Liu et al., ICLR 2021,
fine-grained layer attention (arXiv 2012.14768); Wang et al., ACL 2019, dynamic linear combination
of layers (arXiv 1906.01787). The computation lives in the seams (``memory.py`` for transparent and
fine-grained, ``connections.py`` for DLCL); this file only names the family and adds
``fusion_weights()``, the learned layer weights that Liu et al. plot as a heatmap (decoder layer x
encoder layer), to show that the top decoder layers lean on the *embedding* layer.
"""

from __future__ import annotations

import torch
from torch import nn

from .configuration_encoder_fusion import EncoderFusionConfig
from .modeling_fusion_transformer import FusionTransformerForConditionalGeneration, FusionTransformerModel


@torch.no_grad()
def collect_fusion_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The learned layer-mixing weights of any hf_fusion model, by seam.

    Works on every family (a SurfaceFusion model with a fine-grained memory has them too) and on
    classes loaded with ``trust_remote_code``: it asks each seam module for ``layer_weights()``.

    Args:
        model: An hf_fusion base or LM model.

    Returns:
        Detached float tensors, only for the seams that learn such weights:
        ``"encoder_memory"``: ``(decoder_layers, encoder_layers + 1)``, column 0 = the embedding
        layer, each row a distribution over encoder layers (for ``fine_grained`` the mean over
        dimensions of the per-dimension distributions);
        ``"encoder_connection"`` / ``"decoder_connection"``: DLCL's ``(layers + 1, layers + 1)``
        lower-triangular W, row l = the weights of y_0..y_l in step l's input (last row: the
        stack output), not normalised.
    """
    base = model.base_model
    weights = {}
    if hasattr(base.decoder.memory, "layer_weights"):
        weights["encoder_memory"] = base.decoder.memory.layer_weights()
    for side in ("encoder", "decoder"):
        connection = getattr(base, side).connection
        if hasattr(connection, "layer_weights"):
            weights[f"{side}_connection"] = connection.layer_weights()
    return weights


class FusionWeightsMixin:
    """Adds ``fusion_weights()`` to the EncoderFusion models."""

    def fusion_weights(self) -> dict[str, torch.Tensor]:
        """The learned layer weights by seam; see :func:`collect_fusion_weights`."""
        return collect_fusion_weights(self)


class EncoderFusionModel(FusionWeightsMixin, FusionTransformerModel):
    """The EncoderFusion encoder-decoder without an output head."""

    config_class = EncoderFusionConfig


class EncoderFusionForConditionalGeneration(FusionWeightsMixin, FusionTransformerForConditionalGeneration):
    """The EncoderFusion seq2seq model, ready for ``Seq2SeqTrainer`` and ``generate``."""

    config_class = EncoderFusionConfig


__all__ = ["EncoderFusionModel", "EncoderFusionForConditionalGeneration", "collect_fusion_weights"]
