"""Depth-wise LSTM instead of residual connections (seam 2, ``depth_connection = "depthwise_lstm"``).

Paper: Hongfei Xu, Yang Song, Qiuhui Liu, Josef van Genabith, Deyi Xiong, "Rewiring the
Transformer with Depth-Wise LSTMs", arXiv 2007.06257 (LREC-COLING 2024). No official code was
published; the authors' Neutron library has the matching cell.

What changes. The layers of a stack become the time steps of an LSTM that runs across *depth*:
its state (h, c) replaces the residual stream, and LayerNorm and the feed-forward network are
absorbed into the LSTM cell, so a layer is "attention + one depth-wise LSTM step". With ``a`` an
attention sub-layer's output and (h, c) the state from below, one step is::

    x = [a ; h_prev]
    i, f, o = sigmoid(LN(W_g x + b_g))           # three gates
    c_hat   = act(LN(W_c x + b_c))                # candidate: the FFN's role
    c = f * c_prev + i * c_hat
    h = o * c                                     # no tanh on the cell output

(``dlstm_candidate = "linear"``, the single projection the paper describes and the authors' cells
use). ``dlstm_candidate = "ffn"`` computes the candidate with a whole feed-forward network instead,
``c_hat = W_2 act(LN(W_1 x + b_1)) + b_2`` (inner width ``encoder_ffn_dim`` / ``decoder_ffn_dim``,
another of the authors' cell variants); the gates are then the only blocks of the pre-activation
LayerNorm.

The defaults are the authors' cell (their Neutron library's RNMT LSTM cell and its dual-input
decoder variant):
- ``dlstm_activation = "tanh"``: a signed candidate. ``"relu"`` (the Transformer FFN's activation)
  is offered but is not the authors' choice: a non-negative candidate lets c only accumulate over
  depth, and the project's measurement of a 24+24 model (docs/depthwise_lstm.md) shows it stalling
  at the unigram loss. ``"gelu"`` is the exact (erf) GELU the authors can configure instead.
- ``dlstm_gate_norm = "joint"``: one LayerNorm over all 4·d (3·d with the ``"ffn"`` candidate)
  pre-activations, as the authors' ``LayerNorm((4, d))`` does. ``"per_gate"`` normalises each
  block over its own d, as the equations are usually written. Both keep a (blocks, d) scale and
  shift, so the checkpoint layout is the same.
- ``dlstm_attention_residual = True``: each attention sub-layer keeps a pre-norm residual on the
  normalised input, ``a = LN(x) + dropout(Attn(LN(x)))``, as the authors' attention modules do by
  default. ``False`` is the paper's "pure attention" description, ``a = dropout(Attn(x))``, with
  no LayerNorm outside the cells.
- ``dlstm_decoder_mode = "concat"``: the authors' dual-input decoder cell, one step per layer on
  ``x = [a ; b ; h_prev]`` with ``a`` the self-attention and ``b`` the cross-attention sub-layer
  (the cross-attention queries with ``a``, keeping the sub-layers cascaded).
  ``"per_sublayer"`` takes one step after each sub-layer instead (``a`` from h_prev, a step, ``b``
  from the new h, a second step), reading the abstract's "layers and sub-layers" literally.

- Encoder layer: ``a`` = self-attention sub-layer of ``h_prev``, then one step.
- The attention modules are the core's ``FusionAttention``, so keys/values are cached per depth
  step exactly as in the residual model.

Where it plugs in. :class:`DepthwiseLSTMConnection` is the stack-level connection object. A
layer receives the *packed* tensor ``[h ; c]`` of shape ``(batch, len, 2 * d_model)`` as its first
positional argument and returns the packed new state: one tensor rather than a tuple because
reentrant gradient checkpointing only tracks tensors passed positionally (a tuple would silently
cut the gradient of c). Between layers the connection keeps ``(h, c)`` apart and exposes ``h``, so
``output_hidden_states`` and the encoder-memory seam (EncoderFusion's layer states) see
d_model-wide states that the next step really consumes.

Other choices (the paper leaves them open):
- Initial state: ``h_0 = c_0 = `` the embedding layer output (tokens + positions, after the
  embedding LayerNorm and dropout), exactly what the residual stack starts from. The authors'
  encoder and decoder do the same.
- Dropout (``config.dropout``) on each attention output before it enters the cell and on the
  candidate ``c_hat``: the two places a residual layer drops its sub-layer outputs.
- The depth-wise LSTM family config turns ``add_final_layer_norm`` on: ``h = o * c`` is not
  normalised and the cell state grows with depth, and the authors normalise the stack output too.
- Configs saved before ``dlstm_attention_residual`` existed load with it off (pure attention),
  which is what those checkpoints compute (``legacy_field_values`` in the core config).

Parameters (``"linear"`` candidate, d = d_model): an encoder layer has 4d² attention + 8d² cell =
12d², the residual layer's count, plus 2d for the attention LayerNorm of the authors' form; a
decoder layer has 20d² (``"concat"``) or 24d² (``"per_sublayer"``) against the residual 16d². The
``"ffn"`` candidate puts a whole FFN (12d² with inner width 4d: 2d -> 4d -> d) in every cell while
the gates shrink to 6d² (encoder layer: 22d²).

Config fields the connection does not use: ``activation_function``, and ``encoder_ffn_dim`` /
``decoder_ffn_dim`` / ``activation_dropout`` unless the candidate is ``"ffn"``;
``normalize_before=True`` is refused (the cells normalise their own pre-activations).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.modeling_layers import GradientCheckpointingLayer

from .layers import FusionAttention

if TYPE_CHECKING:
    from .configuration_fusion_transformer import FusionTransformerConfig


GATES = 3  # input, forget and output gate


class GateLayerNorm(nn.LayerNorm):
    """LayerNorm of the ``(..., num_blocks, d)`` LSTM pre-activations with a (num_blocks, d) scale
    and shift.

    Args:
        num_blocks: 4 (three gates + the ``"linear"`` candidate) or 3 (the gates only).
        d_model: Width d of each block.
        joint: Normalise all num_blocks·d values together (Neutron) instead of each block over its d.
        eps: LayerNorm epsilon.
    """

    def __init__(self, num_blocks: int, d_model: int, joint: bool, eps: float):
        super().__init__((num_blocks, d_model), eps=eps)
        self.joint = joint

    def forward(self, pre_activations: torch.Tensor) -> torch.Tensor:
        if self.joint:
            return super().forward(pre_activations)
        normed = nn.functional.layer_norm(pre_activations, pre_activations.shape[-1:], eps=self.eps)
        return normed * self.weight + self.bias


class DepthwiseLSTMCell(nn.Module):
    """One depth-wise LSTM step: ``(inputs, h, c) -> (h', c')``.

    Args:
        config: The model config (``d_model``, ``dlstm_gate_norm``, ``dlstm_activation``,
            ``dlstm_candidate``, ``dropout``, ``activation_dropout``, ``layer_norm_eps``).
        ffn_dim: Inner width of the ``"ffn"`` candidate (the stack's ``*_ffn_dim``).
        num_inputs: Number of d_model-wide sub-layer outputs concatenated before ``h`` (1, or 2
            for the decoder's ``"concat"`` mode).
    """

    def __init__(self, config: FusionTransformerConfig, ffn_dim: int, num_inputs: int = 1):
        super().__init__()
        d_model, in_dim = config.d_model, (num_inputs + 1) * config.d_model
        self.d_model = d_model
        self.dropout = config.dropout
        self.activation_dropout = config.activation_dropout
        self.ffn_candidate = config.dlstm_candidate == "ffn"
        self.num_blocks = GATES if self.ffn_candidate else GATES + 1
        # One projection for the gates and the "linear" candidate: rows [i; f; o (; c_hat)], each d tall.
        self.proj = nn.Linear(in_dim, self.num_blocks * d_model)
        self.norm = GateLayerNorm(self.num_blocks, d_model, config.dlstm_gate_norm == "joint", config.layer_norm_eps)
        self.activation = ACT2FN[config.dlstm_activation]
        if self.ffn_candidate:
            self.fc1 = nn.Linear(in_dim, ffn_dim)
            self.ffn_layer_norm = nn.LayerNorm(ffn_dim, eps=config.layer_norm_eps)
            self.fc2 = nn.Linear(ffn_dim, d_model)

    def forward(
        self, inputs: Sequence[torch.Tensor], h: torch.Tensor, c: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Args:
            inputs: sub-layer outputs, each (batch, len, d_model).
            h, c: the state from below, each (batch, len, d_model).
        Returns the new (h, c).
        """
        x = torch.cat([*inputs, h], dim=-1)  # (batch, len, (num_inputs + 1) * d_model)
        pre = self.norm(self.proj(x).unflatten(-1, (self.num_blocks, self.d_model)))  # (batch, len, blocks, d)
        input_gate, forget_gate, output_gate = torch.sigmoid(pre[..., :GATES, :]).unbind(-2)
        if self.ffn_candidate:
            inner = self.activation(self.ffn_layer_norm(self.fc1(x)))  # (batch, len, ffn_dim)
            inner = nn.functional.dropout(inner, p=self.activation_dropout, training=self.training)
            candidate = self.fc2(inner)
        else:
            candidate = self.activation(pre[..., GATES, :])
        candidate = nn.functional.dropout(candidate, p=self.dropout, training=self.training)
        c = forget_gate * c + input_gate * candidate
        return output_gate * c, c


def attend(
    attention: FusionAttention,
    layer_norm: nn.LayerNorm | None,
    hidden_states: torch.Tensor,
    dropout: float,
    training: bool,
    **attention_kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One attention sub-layer as the depth-wise LSTM consumes it.

    Without ``layer_norm`` it is the paper's "pure attention" ``dropout(Attn(x))``; with one
    (``dlstm_attention_residual``) it is the authors' pre-norm residual form
    ``LN(x) + dropout(Attn(LN(x)))``, whose residual is the *normalised* input (their attention
    modules' default): the LSTM output h = o * c is not normalised and its scale drifts with
    depth, and the normalised residual keeps that drift out of the cell's input. Returns the
    sub-layer output (batch, len, d_model) and the attention weights.
    """
    query = hidden_states if layer_norm is None else layer_norm(hidden_states)
    out, weights = attention(query, **attention_kwargs)
    out = nn.functional.dropout(out, p=dropout, training=training)
    return (out if layer_norm is None else query + out), weights


def attention_layer_norm(config: FusionTransformerConfig) -> nn.LayerNorm | None:
    """The pre-norm LayerNorm of an attention sub-layer, when ``dlstm_attention_residual`` asks for one."""
    return nn.LayerNorm(config.d_model, eps=config.layer_norm_eps) if config.dlstm_attention_residual else None


def unpack_state(state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(batch, len, 2 * d_model)`` packed ``[h ; c]`` -> ``h, c``, each (batch, len, d_model)."""
    h, c = state.chunk(2, dim=-1)
    return h, c


def pack_state(h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``h, c`` (batch, len, d_model) -> packed ``[h ; c]`` (batch, len, 2 * d_model)."""
    return torch.cat([h, c], dim=-1)


class DepthwiseLSTMEncoderLayer(GradientCheckpointingLayer):
    """Self-attention over ``h`` (see :func:`attend`), then one depth-wise LSTM step."""

    def __init__(self, config: FusionTransformerConfig):
        super().__init__()
        self.dropout = config.dropout
        self.self_attn = FusionAttention(config, config.encoder_attention_heads)
        self.self_attn_layer_norm = attention_layer_norm(config)
        self.lstm = DepthwiseLSTMCell(config, config.encoder_ffn_dim)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor | None, ...]]:
        """Args: hidden_states: packed ``[h ; c]`` (batch, src_len, 2 * d_model); attention_mask
        boolean (batch, 1, 1, src_len). Returns the packed new state and the attention weights."""
        h, c = unpack_state(hidden_states)
        attn_out, attn_weights = attend(
            self.self_attn,
            self.self_attn_layer_norm,
            h,
            self.dropout,
            self.training,
            attention_mask=attention_mask,
            output_attentions=output_attentions,
        )
        h, c = self.lstm([attn_out], h, c)
        return pack_state(h, c), (attn_weights,)


class DepthwiseLSTMDecoderLayer(GradientCheckpointingLayer):
    """Causal self-attention and cross-attention joined by depth-wise LSTM steps: one after each
    sub-layer (``"per_sublayer"``) or one on both outputs concatenated (``"concat"``)."""

    def __init__(self, config: FusionTransformerConfig):
        super().__init__()
        self.dropout = config.dropout
        self.per_sublayer = config.dlstm_decoder_mode == "per_sublayer"
        self.self_attn = FusionAttention(config, config.decoder_attention_heads, is_causal=True)
        self.self_attn_layer_norm = attention_layer_norm(config)
        self.encoder_attn = FusionAttention(config, config.decoder_attention_heads, is_cross_attention=True)
        self.encoder_attn_layer_norm = attention_layer_norm(config)
        if self.per_sublayer:
            self.self_attn_lstm = DepthwiseLSTMCell(config, config.decoder_ffn_dim)
            self.encoder_attn_lstm = DepthwiseLSTMCell(config, config.decoder_ffn_dim)
        else:
            self.lstm = DepthwiseLSTMCell(config, config.decoder_ffn_dim, num_inputs=2)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        cache_idx: int = 0,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor | None, ...]]:
        """Args:
            hidden_states: packed ``[h ; c]`` (batch, tgt_len, 2 * d_model).
            attention_mask: boolean causal mask (batch|1, 1, tgt_len, past+tgt_len) or ``None``.
            encoder_hidden_states: this step's memory (batch, src_len, d_model); may be ``None``
                once the cross-attention cache slot ``cache_idx`` is filled.
            encoder_attention_mask: boolean (batch, 1, 1, src_len) or ``None``.
            past_key_values: an ``EncoderDecoderCache``; this call uses slot ``cache_idx``.
        Returns the packed new state and (self-attention weights, cross-attention weights).
        """
        h, c = unpack_state(hidden_states)
        self_out, self_weights = attend(
            self.self_attn,
            self.self_attn_layer_norm,
            h,
            self.dropout,
            self.training,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            cache_idx=cache_idx,
            output_attentions=output_attentions,
        )
        if self.per_sublayer:
            h, c = self.self_attn_lstm([self_out], h, c)
        if encoder_hidden_states is None:  # a decoder used on its own: no cross-attention step (BART)
            if not self.per_sublayer:
                h, c = self.lstm([self_out, torch.zeros_like(self_out)], h, c)
            return pack_state(h, c), (self_weights, None)
        cross_out, cross_weights = attend(
            self.encoder_attn,
            self.encoder_attn_layer_norm,
            h if self.per_sublayer else self_out,
            self.dropout,
            self.training,
            key_value_states=encoder_hidden_states,
            attention_mask=encoder_attention_mask,
            past_key_values=past_key_values,
            cache_idx=cache_idx,
            output_attentions=output_attentions,
        )
        if self.per_sublayer:
            h, c = self.encoder_attn_lstm([cross_out], h, c)
        else:
            h, c = self.lstm([self_out, cross_out], h, c)
        return pack_state(h, c), (self_weights, cross_weights)


class DepthwiseLSTMConnection(nn.Module):
    """Stack-level side of the depth-wise LSTM: the running state is the pair ``(h, c)``.

    The layers do the LSTM steps on the packed ``[h ; c]`` (one tensor, for reentrant gradient
    checkpointing); the connection starts the state from the embeddings (``h_0 = c_0 =
    embeddings``), packs it for each layer and unpacks what comes back. It keeps ``h`` as its own
    tensor so that the ``h`` a step exposes (``output_hidden_states``, the layer states EncoderFusion
    reads) is the very tensor the next step consumes: gradients reach it, and ``retain_grad`` on a
    returned hidden state sees them.

    Args:
        config: The model config.
        num_steps: Depth of the stack this connection runs.
    """

    def __init__(self, config: FusionTransformerConfig, num_steps: int):
        super().__init__()

    def start(self, embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return embeddings, embeddings

    def layer_input(self, state: tuple[torch.Tensor, torch.Tensor], step_idx: int) -> torch.Tensor:
        return pack_state(*state)

    def update(
        self, state: tuple[torch.Tensor, torch.Tensor], layer_output: torch.Tensor, step_idx: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return unpack_state(layer_output)

    def hidden(self, state: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return state[0]

    def finish(self, state: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return state[0]


__all__ = [
    "DepthwiseLSTMCell",
    "DepthwiseLSTMConnection",
    "DepthwiseLSTMDecoderLayer",
    "DepthwiseLSTMEncoderLayer",
    "GateLayerNorm",
]
