"""Seam 3, the encoder memory: what each decoder step's cross-attention reads.

The encoder always returns its final output; when a provider sets ``needs_layer_states`` it also
returns every layer's state stacked as ``(batch, num_encoder_layers + 1, src_len, d_model)``
(index 0 = the embedding layer output) and the token embeddings without positions. The decoder
asks the provider for step ``step_idx``'s memory only while that step's cross-attention cache slot
is empty, so a fused memory costs nothing per generated token.

Providers (``encoder_memory``):

    last          X^N, the vanilla seq2seq memory.
    transparent   Z^m = sum_n softmax_n(W[n, m]) X^n: Bapna et al., EMNLP 2018, "Training Deeper
                  Neural Machine Translation Models with Transparent Attention" (arXiv 1808.07561).
    fine_grained  S^m = LN(sum_n softmax_n(W[m, n, :]) * X^n): Liu et al., ICLR 2021, "Understanding
                  and Improving Encoder Layer Fusion in Sequence-to-Sequence Learning"
                  (arXiv 2012.14768), the "EncoderFusion" its SurfaceFusion analysis starts from.

Both fusing providers keep one weight row per decoder *step* (not per parameter block), so under
cross-layer parameter sharing every depth still learns its own mix of encoder layers. A provider
that learns such weights exposes them, normalised, as ``layer_weights()`` (decoder step x encoder
layer) for analysis and the heatmap of ``hf_fusion.visualization``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import initialization as init

if TYPE_CHECKING:
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


def require_layer_states(encoder_layer_states: torch.Tensor | None, memory: str) -> torch.Tensor:
    """Refuse to fuse without the encoder's layer states (e.g. hand-made ``encoder_outputs``)."""
    if encoder_layer_states is None:
        raise ValueError(
            f"encoder_memory = {memory!r} reads every encoder layer, but the encoder outputs carry no "
            "layer_states; pass the output of model.get_encoder()(...) as encoder_outputs."
        )
    return encoder_layer_states


class TransparentAttentionMemory(nn.Module):
    """Transparent attention (Bapna et al. 2018): decoder step m reads a convex combination of
    all encoder layers, one learned scalar per (encoder layer, decoder step)::

        s[:, m] = softmax_n(dropout(W[:, m]))        Z^m = sum_n s[n, m] X^n

    X^0 is the embedding layer output (token + position embeddings, as the stack computed it)
    passed through an extra LayerNorm, as the reference implementations do, so that the raw
    embedding scale does not dominate the mix (``fusion_embedding_layer_norm``). Dropout on W
    before the softmax (``fusion_dropout``, Lingvo's default 0.1) keeps the decoder from locking
    onto a single layer early. W starts uniform in +-sqrt(1 / (N + 1)).

    Args:
        config: The model config (``encoder_layers``, ``decoder_layers``, ``fusion_dropout``,
            ``fusion_embedding_layer_norm``).
    """

    needs_layer_states = True

    def __init__(self, config: FusionTransformerConfig):
        super().__init__()
        self.dropout = config.fusion_dropout
        self.weight = nn.Parameter(torch.empty(config.encoder_layers + 1, config.decoder_layers))  # W[n, m]
        self.embedding_layer_norm = (
            nn.LayerNorm(config.d_model, eps=config.layer_norm_eps) if config.fusion_embedding_layer_norm else None
        )
        self.init_own_weights()

    def init_own_weights(self) -> None:
        """Uniform in +-sqrt(1 / (N + 1)) (skipped for weights already loaded from a checkpoint)."""
        bound = math.sqrt(1.0 / self.weight.shape[0])
        init.uniform_(self.weight, -bound, bound)

    def layer_weights(self) -> torch.Tensor:
        """The ``(decoder_layers, encoder_layers + 1)`` mixing weights, rows summing to 1."""
        return self.weight.detach().float().softmax(dim=0).T

    def forward(
        self,
        step_idx: int,
        encoder_hidden_states: torch.Tensor,
        encoder_layer_states: torch.Tensor | None = None,
        encoder_token_embeddings: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Return decoder step ``step_idx``'s ``(batch, src_len, d_model)`` memory Z^m."""
        states = require_layer_states(encoder_layer_states, "transparent")  # (batch, N + 1, src_len, d_model)
        if self.embedding_layer_norm is not None:
            states = torch.cat([self.embedding_layer_norm(states[:, :1]), states[:, 1:]], dim=1)
        logits = nn.functional.dropout(self.weight[:, step_idx], p=self.dropout, training=self.training)
        weights = logits.softmax(dim=0).to(states.dtype)  # (N + 1,)
        return torch.einsum("n,bnsd->bsd", weights, states)


class FineGrainedLayerAttentionMemory(nn.Module):
    """Fine-grained layer attention (Liu et al. 2021): like transparent attention, but with one
    weight per (decoder step, encoder layer, dimension), normalised over layers per dimension::

        w = softmax_n(dropout(W[m, :, :]))                      # (N + 1, d), DropConnect
        S^m = dropout(LN(sum_n w[n] * X^n))

    which is the official code's order. X^0 is the *token* embedding without positions (the
    encoder's ``token_embeddings``) after dropout and, in post-norm models, a LayerNorm (the
    official ``layernorm_srcemb``; ``fusion_embedding_layer_norm``). The official code drops X^0
    out twice, once with the encoder's embedding-dropout mask and once more on its own; with
    ``fusion_double_embedding_dropout`` (the default) so does this memory, otherwise once. The
    LayerNorm after the sum is one module shared by every decoder step, and the DropConnect and
    output dropouts use ``fusion_dropout`` (0.3 in all of the paper's experiments; the official
    code's default is 0.1), as in the official code. In pre-norm models X^N is the raw top state
    before the encoder's final LayerNorm, as in the official code (``fusion_top_layer_norm``
    switches to the normalised output). W starts uniform in +-sqrt(2 / (M + N + 1)).

    Deviation from the official code: the embedding dropout masks are drawn here, per decoder step
    (the memory is built per step and the encoder does not expose its mask), rather than shared
    with the encoder's embedding dropout; the rates and their number are the official ones.

    Args:
        config: The model config (``encoder_layers``, ``decoder_layers``, ``d_model``, ``dropout``,
            ``fusion_dropout``, ``fusion_embedding_layer_norm``, ``fusion_double_embedding_dropout``).
    """

    needs_layer_states = True

    def __init__(self, config: FusionTransformerConfig):
        super().__init__()
        self.dropout = config.fusion_dropout
        self.embedding_dropout = config.dropout
        self.embedding_dropouts = 2 if config.fusion_double_embedding_dropout else 1
        self.weight = nn.Parameter(torch.empty(config.decoder_layers, config.encoder_layers + 1, config.d_model))
        self.embedding_layer_norm = (
            nn.LayerNorm(config.d_model, eps=config.layer_norm_eps) if config.fusion_embedding_layer_norm else None
        )
        self.layer_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.init_own_weights()

    def init_own_weights(self) -> None:
        """Uniform in +-sqrt(2 / (M + N + 1)) (skipped for weights already loaded)."""
        bound = math.sqrt(2.0 / (self.weight.shape[0] + self.weight.shape[1]))
        init.uniform_(self.weight, -bound, bound)

    def layer_weights(self) -> torch.Tensor:
        """The ``(decoder_layers, encoder_layers + 1)`` weights, averaged over dimensions (each
        dimension's weights sum to 1 over layers, so rows still sum to 1)."""
        return self.weight.detach().float().softmax(dim=1).mean(dim=-1)

    def forward(
        self,
        step_idx: int,
        encoder_hidden_states: torch.Tensor,
        encoder_layer_states: torch.Tensor | None = None,
        encoder_token_embeddings: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Return decoder step ``step_idx``'s ``(batch, src_len, d_model)`` memory S^m."""
        states = require_layer_states(encoder_layer_states, "fine_grained")  # (batch, N + 1, src_len, d_model)
        embeddings = encoder_token_embeddings
        for _ in range(self.embedding_dropouts):
            embeddings = nn.functional.dropout(embeddings, p=self.embedding_dropout, training=self.training)
        if self.embedding_layer_norm is not None:
            embeddings = self.embedding_layer_norm(embeddings)
        logits = nn.functional.dropout(self.weight[step_idx], p=self.dropout, training=self.training)
        weights = logits.softmax(dim=0).to(states.dtype)  # (N + 1, d_model)
        # sum_n w[n] * X^n with X^0 = the token embeddings, as a chain of multiply-adds: the einsum
        # "nd,bnsd->bsd" runs as a product batched over d that copies every layer state, forward
        # and backward (about 100x slower on a CPU), and a cat for X^0 would copy them once more.
        fused = embeddings * weights[0]
        for layer_idx in range(1, weights.shape[0]):
            fused = torch.addcmul(fused, states[:, layer_idx], weights[layer_idx])
        return nn.functional.dropout(self.layer_norm(fused), p=self.dropout, training=self.training)
