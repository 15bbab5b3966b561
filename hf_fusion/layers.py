"""Primitives of the hf_fusion Transformer: embeddings, positions, attention, masks, residual layers.

Design choices:
- Submodule names follow BART (``self_attn``, ``encoder_attn``, ``fc1``, ``self_attn_layer_norm``,
  ...). They are checkpoint keys: converting a BART/mBART/Marian checkpoint is a key-for-key copy.
- Attention goes through the HF attention interface (SDPA by default). A call that asks for
  attention weights runs the eager kernel for that call only, since SDPA cannot return them.
- Masks are boolean (True = attend) and built here rather than by ``masking_utils`` so that the
  same mask serves SDPA and eager, and so that causal self-attention without padding passes no
  mask at all and lets SDPA use its ``is_causal`` fast path.
- A layer module is a *parameter block*. It may run at several depth steps (parameter sharing),
  so the cache slot is passed in at call time (``cache_idx`` = the step), never stored.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, EncoderDecoderCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import is_torch_flex_attn_available, is_torchdynamo_compiling

if is_torch_flex_attn_available():
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask

if TYPE_CHECKING:
    from .configuration_fusion_transformer import FusionTransformerConfig


class ScaledWordEmbedding(nn.Embedding):
    """Token embedding multiplied by ``embed_scale`` (sqrt(d_model) when ``scale_embedding``)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None, embed_scale: float = 1.0):
        super().__init__(num_embeddings, embedding_dim, padding_idx)
        self.embed_scale = embed_scale

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return super().forward(input_ids) * self.embed_scale


def check_sequence_length(seq_len: int, past_len: int | torch.Tensor, max_positions: int, side: str) -> None:
    """Refuse a sequence longer than the position table instead of failing inside an index op.

    Skipped inside a compiled graph, where ``past_len`` is a tensor (static cache) and a Python
    branch on it would break the graph; the eager first step of ``generate`` has checked already.
    """
    if is_torchdynamo_compiling():
        return
    if past_len + seq_len > max_positions:
        raise ValueError(
            f"The {side} sequence has {past_len + seq_len} positions but the model supports at most "
            f"max_position_embeddings = {max_positions}; truncate the input (e.g. tokenizer(..., truncation=True, "
            f"max_length={max_positions})) or build the model with a larger max_position_embeddings."
        )


class LearnedPositionalEmbedding(nn.Embedding):
    """BART's learned positions. Row ``p + 2`` holds position ``p``: fairseq reserved two rows and
    BART/mBART checkpoints kept that layout, so the offset is part of the checkpoint format."""

    offset = 2

    def __init__(self, max_positions: int, embedding_dim: int):
        super().__init__(max_positions + self.offset, embedding_dim)
        self.max_positions = max_positions

    def forward(self, seq_len: int, past_len: int = 0, side: str = "input") -> torch.Tensor:
        """Return the ``(seq_len, dim)`` position embeddings for positions ``past_len ...``."""
        check_sequence_length(seq_len, past_len, self.max_positions, side)
        positions = torch.arange(seq_len, device=self.weight.device) + past_len  # static shape under compile
        return super().forward(positions + self.offset)


class SinusoidalPositionalEmbedding(nn.Module):
    """Marian's fixed sinusoidal positions: sines in the first half of the channels, cosines in the
    second. The table is derived, not learned, so it is a non-persistent buffer (filled by
    ``_init_weights``) and never written to checkpoints."""

    def __init__(self, max_positions: int, embedding_dim: int):
        super().__init__()
        self.max_positions = max_positions
        self.embedding_dim = embedding_dim
        self.register_buffer("weight", torch.empty(max_positions, embedding_dim), persistent=False)

    def init_own_weights(self) -> None:
        """Fill the table (``_init_weights`` calls this; it is never loaded from a checkpoint)."""
        init.copy_(self.weight, self.table())

    def table(self) -> torch.Tensor:
        """The ``(max_positions, dim)`` table, computed in float64 then cast, as Marian does."""
        position = torch.arange(self.max_positions, dtype=torch.float64)[:, None]
        channel = torch.arange(self.embedding_dim, dtype=torch.float64)[None, :]
        angle = position / torch.pow(10000.0, 2 * torch.div(channel, 2, rounding_mode="floor") / self.embedding_dim)
        half = self.embedding_dim // 2
        table = torch.empty(self.max_positions, self.embedding_dim, dtype=torch.float64)
        table[:, :half] = torch.sin(angle[:, 0::2])
        table[:, half:] = torch.cos(angle[:, 1::2])
        return table.float()

    def forward(self, seq_len: int, past_len: int = 0, side: str = "input") -> torch.Tensor:
        check_sequence_length(seq_len, past_len, self.max_positions, side)
        positions = torch.arange(seq_len, device=self.weight.device) + past_len  # static shape under compile
        return self.weight.index_select(0, positions)


def build_position_embedding(config: FusionTransformerConfig) -> nn.Module:
    """The position module the config asks for (``learned`` or ``sinusoidal``)."""
    if config.position_embedding_type == "sinusoidal":
        return SinusoidalPositionalEmbedding(config.max_position_embeddings, config.d_model)
    return LearnedPositionalEmbedding(config.max_position_embeddings, config.d_model)


def padding_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """``(batch, src_len)`` 0/1 mask -> ``(batch, 1, 1, src_len)`` boolean key mask, or ``None``
    when nothing is padded (checked eagerly only, so a compiled graph keeps the mask)."""
    if attention_mask is None:
        return None
    if not is_torchdynamo_compiling() and bool(attention_mask.all()):
        return None
    return attention_mask[:, None, None, :].bool()


def causal_mask(
    tgt_len: int,
    past_len: int | torch.Tensor,
    kv_len: int,
    attention_mask: torch.Tensor | None,
    device: torch.device,
) -> torch.Tensor | None:
    """Boolean ``(batch|1, 1, tgt_len, kv_len)`` causal self-attention mask, or ``None`` when the
    attention kernel's own ``is_causal`` (no past, no padding) or no mask (one query) suffices.

    Args:
        tgt_len: Number of new queries.
        past_len: Positions already in the cache (a 0-d tensor for a static cache).
        kv_len: Length of the keys the attention will see: ``past_len + tgt_len`` for a dynamic
            cache, the preallocated length for a static one (its unwritten tail stays masked
            because it lies in the future of every query).
        attention_mask: ``(batch, past_len + tgt_len)`` 0/1 padding mask; or a 4-D mask that
            ``generate`` already built for a static cache, boolean (True = attend) or additive
            (0 = attend), passed through as boolean.
    """
    if attention_mask is not None and attention_mask.dim() == 4:
        return attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
    if attention_mask is None and kv_len == tgt_len and not isinstance(past_len, torch.Tensor):
        return None  # no past: SDPA's is_causal
    if attention_mask is None and tgt_len == 1 and not isinstance(past_len, torch.Tensor) and kv_len == past_len + 1:
        return None  # one query over its whole past
    query_pos = torch.arange(tgt_len, device=device)[:, None] + past_len
    key_pos = torch.arange(kv_len, device=device)[None, :]
    mask = (key_pos <= query_pos)[None, None]  # (1, 1, tgt_len, kv_len)
    if attention_mask is not None:
        padding = attention_mask.bool()[:, -kv_len:]
        if padding.shape[-1] < kv_len:  # static cache: the keys beyond the mask lie in the future anyway
            padding = nn.functional.pad(padding, (0, kv_len - padding.shape[-1]), value=False)
        mask = mask & padding[:, None, None, :]
    return mask


# How each attention kernel of the HF interface takes its mask (see ``kernel_mask``).
FLASH_KERNELS = ("flash_attention_2", "flash_attention_3")
FLEX_KERNEL = "flex_attention"


def kernel_mask(
    implementation: str,
    mask: torch.Tensor | None,
    padding: torch.Tensor | None,
    batch: int,
    query_len: int,
    key_len: int,
    causal: bool,
    device: torch.device,
) -> torch.Tensor | BlockMask | None:
    """The attention mask in the form the chosen kernel takes.

    ``padding_mask`` / ``causal_mask`` build one boolean mask (``None`` when the kernel's own
    causal flag or no mask suffices), which is what SDPA and eager take. Flash attention takes
    instead the ``(batch, key_len)`` 0/1 key padding mask and applies causality itself
    (bottom-right aligned, so a cached decoding step sees its whole past); flex attention takes
    a ``BlockMask`` (its score-mask path would *add* a boolean mask to the scores).

    Args:
        implementation: ``config._attn_implementation`` (``"eager"`` when attention weights are
            requested, since only eager returns them).
        mask: The boolean (batch|1, 1, query_len|1, key_len) mask or ``None``.
        padding: The 2-D 0/1 mask over the keys this attention sees, or ``None``.
        causal: Whether this is causal self-attention (``mask is None`` then means "use
            ``is_causal``" when there is more than one query).
        device: Where the mask lives.
    """
    if implementation in FLASH_KERNELS:
        if mask is not None and padding is None:
            raise ValueError(
                f"attn_implementation = {implementation!r} takes a 2-D padding mask, not the 4-D mask a static "
                "cache builds; generate with cache_implementation='dynamic' or use attn_implementation='sdpa'."
            )
        if padding is None or (not is_torchdynamo_compiling() and bool(padding.all())):
            return None
        return padding[:, -key_len:]
    if implementation != FLEX_KERNEL:
        return mask
    if mask is None:
        if not causal or query_len == 1:
            return None
        key_pos = torch.arange(key_len, device=device)
        mask = key_pos[None, :] <= key_pos[-query_len:, None]  # (query_len, key_len), bottom-right aligned
    dense = mask.expand(batch, 1, query_len, key_len)

    def mask_mod(batch_idx, head_idx, q_idx, kv_idx):
        return dense[batch_idx, 0, q_idx, kv_idx]

    return create_block_mask(mask_mod, batch, None, query_len, key_len, device=dense.device)


def is_boolean_mask(mask: object) -> bool:
    """Whether ``mask`` is a boolean 4-D tensor (the form ``padding_mask`` / ``causal_mask`` build)."""
    return isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and mask.dim() == 4


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain softmax attention over ``(batch, heads, len, head_dim)`` tensors with a boolean mask.
    Honours ``is_causal`` without a mask, as SDPA does, so both kernels see the same inputs."""
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling  # (batch, heads, tgt_len, src_len)
    is_causal = module.is_causal if is_causal is None else is_causal
    if attention_mask is None and is_causal and query.shape[2] > 1:
        attention_mask = torch.ones(query.shape[2], key.shape[2], dtype=torch.bool, device=query.device).tril()
    if attention_mask is not None:
        scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    weights = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights, value).transpose(1, 2).contiguous()  # (batch, tgt_len, heads, head_dim)
    return output, weights


def fused_linear(hidden_states: torch.Tensor, projections: tuple[nn.Linear, ...]) -> tuple[torch.Tensor, ...]:
    """Several projections of the same input as one matrix product, returned separately.

    The weights are concatenated on every call rather than stored fused: the parameters, and so
    the checkpoint keys (BART's ``q_proj`` / ``k_proj`` / ``v_proj``), stay exactly as they are,
    and every saved or converted checkpoint loads unchanged. Only used where no gradient is
    recorded (generation, evaluation): in training, autograd keeps the concatenated weights for
    the backward pass, ``3 d^2`` values per attention (at the papers' size all of the 4% by which
    the core's peak training memory exceeded BART's), and on a quiet CPU the fused training step
    was no faster (``benchmarks/levers.py``). Fewer, larger kernel launches per decoding step are
    what it is kept for.

    Args:
        hidden_states: (batch, len, d_in).
        projections: Linear layers with the same input width and the same output width.
    Returns:
        One (batch, len, d_out) tensor per projection.
    """
    weight = torch.cat([proj.weight for proj in projections])  # (n * d_out, d_in)
    bias = None if projections[0].bias is None else torch.cat([proj.bias for proj in projections])
    return nn.functional.linear(hidden_states, weight, bias).split(projections[0].out_features, dim=-1)


class FusionAttention(nn.Module):
    """Multi-head attention (self or cross) with per-step key/value caching.

    Args:
        config: The model config (its ``_attn_implementation`` picks the kernel).
        num_heads: Number of heads.
        is_causal: Whether this is causal self-attention.
        is_cross_attention: Whether keys/values come from the encoder side (and are cached once).
    """

    def __init__(
        self,
        config: FusionTransformerConfig,
        num_heads: int,
        is_causal: bool = False,
        is_cross_attention: bool = False,
    ):
        super().__init__()
        self.is_cross_attention = is_cross_attention
        self.config = config
        self.embed_dim = config.d_model
        self.num_heads = num_heads
        self.head_dim = config.d_model // num_heads
        self.scaling = self.head_dim**-0.5
        self.dropout = config.attention_dropout
        self.is_causal = is_causal
        self.k_proj = nn.Linear(self.embed_dim, self.embed_dim)
        self.v_proj = nn.Linear(self.embed_dim, self.embed_dim)
        self.q_proj = nn.Linear(self.embed_dim, self.embed_dim)
        self.out_proj = nn.Linear(self.embed_dim, self.embed_dim)

    @property
    def fuse_projections(self) -> bool:
        """Whether the projections may run as one matrix product (:func:`fused_linear`): only
        while all three are plain ``nn.Linear`` modules without hooks, so that an adapter (LoRA),
        a quantised layer or a forward hook put on one of them is never bypassed."""
        return all(
            type(proj) is nn.Linear and not proj._forward_hooks and not proj._forward_pre_hooks
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        key_value_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        cache_idx: int | None = None,
        output_attentions: bool = False,
        value_states: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attend from ``hidden_states`` (batch, tgt_len, d_model) to itself or to
        ``key_value_states`` (batch, src_len, d_model); returns the output and, if asked, weights.
        Cross-attention may take its values from ``value_states`` (batch, src_len, d_model) instead
        of ``key_value_states`` (SurfaceFusion: keys from the encoder output, values from the
        source embeddings).

        With a cache, self-attention appends this call's keys/values to slot ``cache_idx``;
        cross-attention fills its slot on the first call and reuses it afterwards, so
        ``key_value_states`` may be ``None`` once the slot is filled.
        """
        is_cross = self.is_cross_attention
        batch, tgt_len = hidden_states.shape[:2]
        cache = past_key_values
        if isinstance(past_key_values, EncoderDecoderCache):
            cache = past_key_values.cross_attention_cache if is_cross else past_key_values.self_attention_cache
        cross_cached = is_cross and cache is not None and past_key_values.is_updated.get(cache_idx, False)
        fused = (
            not torch.is_grad_enabled() and self.fuse_projections and not cross_cached
            and (not is_cross or value_states is None)
        )

        if fused and not is_cross:
            query, key, value = fused_linear(hidden_states, (self.q_proj, self.k_proj, self.v_proj))
        else:
            query = self.q_proj(hidden_states)
        query = query.view(batch, tgt_len, -1, self.head_dim).transpose(1, 2)  # (batch, heads, tgt_len, head_dim)

        if cross_cached:
            key = cache.layers[cache_idx].keys
            value = cache.layers[cache_idx].values
        else:
            source = key_value_states if is_cross else hidden_states
            if fused and is_cross:
                key, value = fused_linear(source, (self.k_proj, self.v_proj))
            elif not fused:
                key = self.k_proj(source)
                value = self.v_proj(source if value_states is None else value_states)
            kv_shape = (batch, source.shape[1], -1, self.head_dim)
            key = key.view(kv_shape).transpose(1, 2)  # (batch, heads, src_len, head_dim)
            value = value.view(kv_shape).transpose(1, 2)
            if cache is not None:
                key, value = cache.update(key, value, cache_idx)
                if is_cross:
                    past_key_values.is_updated[cache_idx] = True

        implementation = "eager" if output_attentions else self.config._attn_implementation
        if implementation in (*FLASH_KERNELS, FLEX_KERNEL) and is_boolean_mask(attention_mask):
            # A boolean mask built outside the stacks (the SurfaceFusion head): its last query row
            # is the key padding, which is what flash attention takes.
            attention_mask = kernel_mask(
                implementation, attention_mask, attention_mask[:, 0, -1, :], batch, tgt_len, key.shape[2],
                causal=self.is_causal, device=query.device,
            )
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
        output, weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.dropout if self.training else 0.0,
            scaling=self.scaling,
        )
        output = self.out_proj(output.reshape(batch, tgt_len, -1))  # (batch, tgt_len, d_model)
        return output, weights if output_attentions else None


class FusionEncoderLayer(GradientCheckpointingLayer):
    """Self-attention + feed-forward, each joined to the stream by a residual connection with
    LayerNorm before (pre-norm) or after (post-norm) the sub-layer."""

    _causal_self_attention = False

    def __init__(self, config: FusionTransformerConfig, ffn_dim: int | None = None, num_heads: int | None = None):
        super().__init__()
        ffn_dim = config.encoder_ffn_dim if ffn_dim is None else ffn_dim
        num_heads = config.encoder_attention_heads if num_heads is None else num_heads
        self.normalize_before = config.normalize_before
        self.dropout = config.dropout
        self.activation_dropout = config.activation_dropout
        self.activation_fn = ACT2FN[config.activation_function]
        self.self_attn = FusionAttention(config, num_heads, is_causal=self._causal_self_attention)
        self.self_attn_layer_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.fc1 = nn.Linear(config.d_model, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, config.d_model)
        self.final_layer_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)

    def sublayer_input(self, hidden_states: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
        """What a sub-layer reads: the normalised stream (pre-norm) or the stream itself."""
        return norm(hidden_states) if self.normalize_before else hidden_states

    def join(self, residual: torch.Tensor, update: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
        """Residual join: ``x + dropout(f(x))``, normalised afterwards in post-norm models."""
        hidden_states = residual + nn.functional.dropout(update, p=self.dropout, training=self.training)
        return hidden_states if self.normalize_before else norm(hidden_states)

    def feed_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """fc2(dropout(act(fc1(x))))."""
        hidden_states = self.activation_fn(self.fc1(hidden_states))
        hidden_states = nn.functional.dropout(hidden_states, p=self.activation_dropout, training=self.training)
        return self.fc2(hidden_states)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor | None, ...]]:
        """Args: hidden_states (batch, src_len, d_model); attention_mask boolean (batch, 1, 1, src_len).
        Returns the new stream and the attention weights (``None`` unless asked for)."""
        attn_out, attn_weights = self.self_attn(
            self.sublayer_input(hidden_states, self.self_attn_layer_norm),
            attention_mask=attention_mask,
            output_attentions=output_attentions,
        )
        hidden_states = self.join(hidden_states, attn_out, self.self_attn_layer_norm)
        ffn_out = self.feed_forward(self.sublayer_input(hidden_states, self.final_layer_norm))
        hidden_states = self.join(hidden_states, ffn_out, self.final_layer_norm)
        return hidden_states, (attn_weights,)


class FusionDecoderLayer(FusionEncoderLayer):
    """Causal self-attention, cross-attention over the layer's encoder memory, feed-forward."""

    _causal_self_attention = True

    def __init__(self, config: FusionTransformerConfig):
        super().__init__(config, ffn_dim=config.decoder_ffn_dim, num_heads=config.decoder_attention_heads)
        self.encoder_attn = FusionAttention(config, config.decoder_attention_heads, is_cross_attention=True)
        self.encoder_attn_layer_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)

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
            hidden_states: (batch, tgt_len, d_model).
            attention_mask: boolean causal mask (batch|1, 1, tgt_len, past+tgt_len) or ``None``.
            encoder_hidden_states: this step's memory (batch, src_len, d_model), read only while the
                cross-attention cache slot ``cache_idx`` is empty; ``None`` skips cross-attention.
            encoder_attention_mask: boolean (batch, 1, 1, src_len) or ``None``.
            past_key_values: an ``EncoderDecoderCache``; this call uses slot ``cache_idx``.
        Returns the new stream and (self-attention weights, cross-attention weights).
        """
        attn_out, self_weights = self.self_attn(
            self.sublayer_input(hidden_states, self.self_attn_layer_norm),
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            cache_idx=cache_idx,
            output_attentions=output_attentions,
        )
        hidden_states = self.join(hidden_states, attn_out, self.self_attn_layer_norm)
        cross_weights = None
        if encoder_hidden_states is not None:  # a decoder used on its own has no cross-attention (BART)
            cross_out, cross_weights = self.encoder_attn(
                self.sublayer_input(hidden_states, self.encoder_attn_layer_norm),
                key_value_states=encoder_hidden_states,
                attention_mask=encoder_attention_mask,
                past_key_values=past_key_values,
                cache_idx=cache_idx,
                output_attentions=output_attentions,
            )
            hidden_states = self.join(hidden_states, cross_out, self.encoder_attn_layer_norm)
        ffn_out = self.feed_forward(self.sublayer_input(hidden_states, self.final_layer_norm))
        hidden_states = self.join(hidden_states, ffn_out, self.final_layer_norm)
        return hidden_states, (self_weights, cross_weights)


def embedding_scale(config: FusionTransformerConfig) -> float:
    """sqrt(d_model) when the config scales embeddings, else 1."""
    return math.sqrt(config.d_model) if config.scale_embedding else 1.0
