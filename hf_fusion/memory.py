"""Seam 3, the encoder memory: what each decoder step's cross-attention reads.

The encoder always returns its final output; when a provider sets ``needs_layer_states`` it also
returns every layer's state stacked as ``(batch, num_encoder_layers + 1, src_len, d_model)``
(index 0 = the embedding layer output) and the token embeddings without positions. The decoder
asks the provider for step ``step_idx``'s memory only while that step's cross-attention cache slot
is empty, so a fused memory costs nothing per generated token.
"""

from __future__ import annotations

import torch
from torch import nn

from .configuration_fusion_transformer import FusionTransformerConfig


class LastLayerMemory(nn.Module):
    """Vanilla seq2seq: every decoder step attends to the top encoder layer's output."""

    needs_layer_states = False

    def __init__(self, config: FusionTransformerConfig):
        super().__init__()

    def forward(
        self,
        step_idx: int,
        encoder_hidden_states: torch.Tensor,
        encoder_layer_states: torch.Tensor | None = None,
        encoder_token_embeddings: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Return the ``(batch, src_len, d_model)`` memory of decoder step ``step_idx``."""
        return encoder_hidden_states
