"""SurfaceFusion: the source embeddings feed the output softmax (seam 4, the output head).

Paper: Xuebo Liu, Longyue Wang, Derek F. Wong, Liang Ding, Lidia S. Chao, Zhaopeng Tu,
"Understanding and Improving Encoder Layer Fusion in Sequence-to-Sequence Learning", ICLR 2021,
arXiv 2012.14768. Reference code: the authors' fairseq 0.9 fork (SunbowLiu/SurfaceFusion), arch
``transformer_surface_fusion`` with ``--surfacefusion att --sf-mode hard --sf-gate 0.8``.

What changes: only the output head. The paper finds that the top decoder layers lean most on the
encoder's *embedding* layer, and connects that layer to the softmax instead of to every decoder
layer. For each target position t, with h_t the top decoder state, X^N the encoder output and V the
source token embeddings (no positions):

    r_t   = MultiHeadAttn(query = stopgrad(h_t), keys = stopgrad(X^N), values = V)
    h'_t  = h_t + FFN(h_t);   r'_t = r_t + FFN(r_t)        one shared residual ReLU FFN (optional)
    l_tgt = E h'_t + b;       l_src = E r'_t + b           the model's tied output projection
    hard: log P = lam * log_softmax(l_tgt) + (1 - lam) * log_softmax(l_src)
          (lam fixed, or a learned gate sigmoid(w . [h'_t; r'_t]) per position)
    soft: log P = log_softmax(l_tgt + log_softmax(tau * l_src))

The values are not detached, so the source-side loss reaches the shared embedding matrix E through
V (the paper's "closer bilingual embeddings"); query and keys are detached, so it reaches neither
the decoder layers nor the encoder layers.

Which tensors, precisely (as in the reference code):
- The query is the last decoder step's state *before* the stack's final LayerNorm
  (``decoder_top_layer_state``); the target path h_t is the decoder output (after that LayerNorm,
  when the model has one). Both are the same tensor in post-norm models, and with this choice hard
  fusion with lam = 1 and no FFN is exactly the plain model.
- V is ``encoder_token_embeddings``: the token embeddings as the encoder adds positions to them,
  i.e. ``embed_scale * E[x]``. With ``scale_embedding=True`` (fairseq's default, the paper's
  setting) that is the paper's sqrt(d)-scaled V. With ``scale_embedding=False`` (BART) V is the
  unscaled E[x], which is what the reference code computes with ``--no-scale-embedding``; a constant
  factor on V is absorbed by the value projection, so this only matters for the initial scale of r
  (smaller by sqrt(d) than in the paper's setting).
- The learned gate reads [h'; r'] (after the FFN), a bias-free ``Linear(2 d, 1)``.
- Dropout: ``config.dropout`` on V and after the FFN's second layer, ``config.activation_dropout``
  inside the FFN, ``config.attention_dropout`` on the surface attention weights.

Loss (the paper's, as the reference trains it): fairseq's label-smoothed cross-entropy applied to
log P itself. Hard log P is *not* renormalised and the label-smoothed loss is linear in log P, so
the loss equals lam * CE_tgt + (1 - lam) * CE_src per token, each with the config's
``label_smoothing``. ``loss_terms`` reports CE_tgt and CE_src (the source distribution as it enters
the fusion: softmax(l_src) in hard mode, softmax(tau * l_src) in soft mode), still attached to the
graph.

Generation: the head returns log P as ``logits`` (float32). Soft log P is normalised. Hard log P
is not: sum_v P(v) = Z <= 1 (weighted AM-GM; equality only for lam in {0, 1} or where the two
distributions coincide).
Hugging Face's ``generate`` log-softmaxes the logits it is given, so it decodes with the
renormalised product of experts P(v) / Z, proportional to p_tgt^lam * p_src^(1 - lam). Greedy
decoding is therefore identical to the reference's; beam search scores each step with
log P - log Z, i.e. the reference's score plus -log Z >= 0, which can reorder beams (the reference
scores with the unnormalised log P); sampling draws from the renormalised distribution. This is a
deliberate choice: it is what any HF decoding strategy needs (a distribution), and the tests pin it.

Incremental decoding: keys and values depend on the source only, but they are projected again at
every decoding step rather than cached. A cache slot of their own would make the cross-attention
cache one layer longer than the self-attention cache, which transformers' cache layout, static
caches and assisted decoding do not allow. The cost per generated token is two (src_len x d) by
(d x d) projections with the default single head, about one decoder layer's cross-attention
projections.

Deviations from the reference code, none of which changes the equations above:
- Initialisation is the core's (normal with ``init_std``) rather than Xavier; the FFN's activation
  is always ReLU, as in the paper (the reference reuses the model's activation, ReLU in its recipe).
- The reference drops out V with the same mask as the encoder's embedding dropout; the core does
  not expose that mask, so V gets its own dropout mask with the same rate.
- The reference treats ``--sf-gate 0`` as "learn the gate"; here ``surface_fusion_lambda=None``
  learns it and 0 means "source distribution only".
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from .heads import HeadContext, HeadOutput, log_prob_nll
from .layers import FusionAttention, padding_mask

if TYPE_CHECKING:
    from .configuration_fusion_transformer import FusionTransformerConfig


class SurfaceFusionFFN(nn.Module):
    """The shared residual ReLU feed-forward network: x + dropout(fc2(dropout(relu(fc1(x)))))."""

    def __init__(self, config: FusionTransformerConfig):
        super().__init__()
        self.dropout = config.dropout
        self.activation_dropout = config.activation_dropout
        self.fc1 = nn.Linear(config.d_model, config.decoder_ffn_dim)
        self.fc2 = nn.Linear(config.decoder_ffn_dim, config.d_model)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        update = nn.functional.relu(self.fc1(hidden_states))
        update = nn.functional.dropout(update, p=self.activation_dropout, training=self.training)
        update = nn.functional.dropout(self.fc2(update), p=self.dropout, training=self.training)
        return hidden_states + update


def pool_source(values: torch.Tensor, attention_mask: torch.Tensor | None, how: str) -> torch.Tensor:
    """Mean or max of ``values`` (batch, src_len, d_model) over the source tokens that
    ``attention_mask`` (batch, src_len; 1 = token) keeps: (batch, d_model)."""
    if attention_mask is None:
        return values.mean(dim=1) if how == "mean" else values.amax(dim=1)
    keep = attention_mask.to(torch.bool)[..., None]  # (batch, src_len, 1)
    if how == "mean":
        return (values * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1)
    return values.masked_fill(~keep, torch.finfo(values.dtype).min).amax(dim=1)


class UnnormalisedBeamScores:
    """Logits processor that makes ``generate``'s beam search score hard SurfaceFusion the way the
    official code does, with the *unnormalised* log P of each step.

    transformers' beam search log-softmaxes the model's logits before any processor sees them,
    which turns hard fusion's log P into log P - log Z. The head records log Z of the step
    it just computed (``record_log_normaliser``), and this processor adds it back. Greedy
    decoding and sampling are unchanged by a per-row constant, and soft fusion has log Z = 0.

    Usage: ``model.generate(..., num_beams=5, logits_processor=[UnnormalisedBeamScores(model)])``.
    """

    def __init__(self, model: nn.Module):
        head = getattr(model, "output_head", None)
        if not isinstance(head, SurfaceFusionHead):
            raise TypeError(
                f"UnnormalisedBeamScores needs a model with the SurfaceFusion head (output_head='surface_fusion'); "
                f"{type(model).__name__} has {type(head).__name__}."
            )
        head.record_log_normaliser = True
        self.head = head

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        log_normaliser = self.head.last_log_normaliser
        if log_normaliser is None or log_normaliser.shape[0] != scores.shape[0]:
            raise RuntimeError("UnnormalisedBeamScores: the model has not produced logits for these rows yet.")
        return scores + log_normaliser[:, None].to(scores.dtype)


class SurfaceFusionHead(nn.Module):
    """Output head that fuses a target distribution (from the decoder) with a source distribution
    (from the source embeddings), see the module docstring for the equations.

    Submodules (checkpoint keys under ``output_head.``): ``surface_attn`` (q/k/v/out projections),
    ``ffn`` (when ``surface_fusion_ffn``), ``gate`` (hard mode with ``surface_fusion_lambda=None``).

    Args:
        config: The model config; reads the ``surface_fusion_*`` fields, ``label_smoothing``,
            the dropouts and ``decoder_ffn_dim``.
    """

    def __init__(self, config: FusionTransformerConfig):
        super().__init__()
        self.mode = config.surface_fusion_mode
        self.fixed_lambda = config.surface_fusion_lambda
        self.tau = config.surface_fusion_tau
        self.label_smoothing = config.label_smoothing
        self.dropout = config.dropout
        self.source = config.surface_fusion_source
        self.query_layer = config.surface_fusion_query_layer
        self.surface_attn = (
            FusionAttention(config, config.surface_fusion_heads, is_cross_attention=True)
            if self.source == "attention"
            else None
        )
        self.ffn = SurfaceFusionFFN(config) if config.surface_fusion_ffn else None
        if config.surface_fusion_linear:
            self.target_proj = nn.Linear(config.d_model, config.d_model, bias=False)
            self.source_proj = nn.Linear(config.d_model, config.d_model, bias=False)
        else:
            self.target_proj = self.source_proj = None
        learned_gate = self.mode == "hard" and self.fixed_lambda is None
        self.gate = nn.Linear(2 * config.d_model, 1, bias=False) if learned_gate else None
        # Set by UnnormalisedBeamScores: keep log Z of the last position for the beam scorer.
        self.record_log_normaliser = False
        self.last_log_normaliser: torch.Tensor | None = None

    def surface_states(self, query_states: torch.Tensor, context: HeadContext) -> torch.Tensor:
        """The surface state r, (batch, tgt_len, d_model): ``MultiHeadAttn(stopgrad(query),
        stopgrad(X^N), V)``, or with the ``"mean"`` / ``"max"`` source the pooled V (padding
        excluded), the same for every target position."""
        if context.encoder_hidden_states is None or context.encoder_token_embeddings is None:
            raise ValueError(
                "The SurfaceFusion head needs the encoder output and the source token embeddings: pass "
                "encoder_outputs as returned by model.get_encoder() (a FusionEncoderOutput with "
                "token_embeddings), not a tuple or a plain BaseModelOutput."
            )
        values = context.encoder_token_embeddings  # (batch, src_len, d_model)
        if self.surface_attn is None:
            pooled = pool_source(values, context.encoder_attention_mask, self.source)  # (batch, d_model)
            pooled = nn.functional.dropout(pooled, p=self.dropout, training=self.training)
            return pooled[:, None].expand(-1, query_states.shape[1], -1)
        values = nn.functional.dropout(values, p=self.dropout, training=self.training)
        surface, _ = self.surface_attn(
            query_states.detach(),
            key_value_states=context.encoder_hidden_states.detach(),
            value_states=values,
            attention_mask=padding_mask(context.encoder_attention_mask),
        )
        return surface

    def query_states(self, decoder_hidden_states: torch.Tensor, context: HeadContext) -> torch.Tensor:
        """The surface attention's query: the state of decoder step ``surface_fusion_query_layer``,
        by default the top step's state before the final LayerNorm (the decoder output when the
        caller passed no decoder states)."""
        if self.query_layer is not None and context.decoder_step_states is not None:
            return context.decoder_step_states[self.query_layer + 1]
        return decoder_hidden_states if context.decoder_top_layer_state is None else context.decoder_top_layer_state

    def fuse(
        self, logits_tgt: torch.Tensor, logits_src: torch.Tensor, target: torch.Tensor, surface: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (log P, log p_tgt, log p_src), each (batch, tgt_len, vocab) in float32."""
        log_p_tgt = nn.functional.log_softmax(logits_tgt, dim=-1)
        if self.mode == "soft":
            log_p_src = nn.functional.log_softmax(self.tau * logits_src, dim=-1)
            return nn.functional.log_softmax(logits_tgt + log_p_src, dim=-1), log_p_tgt, log_p_src
        log_p_src = nn.functional.log_softmax(logits_src, dim=-1)
        if self.gate is None:
            lam = self.fixed_lambda
        else:
            lam = torch.sigmoid(self.gate(torch.cat([target, surface], dim=-1)).float())  # (batch, tgt_len, 1)
        return lam * log_p_tgt + (1.0 - lam) * log_p_src, log_p_tgt, log_p_src

    def forward(
        self,
        project: Callable[[torch.Tensor], torch.Tensor],
        decoder_hidden_states: torch.Tensor,
        context: HeadContext,
    ) -> HeadOutput:
        """Args:
            project: The tied output projection ``E h + b``, (..., d_model) -> (..., vocab).
            decoder_hidden_states: (batch, tgt_len, d_model) decoder output, the target path's h.
            context: Labels, and the encoder side: ``encoder_hidden_states`` X^N (the keys),
                ``encoder_token_embeddings`` V (the values), ``encoder_attention_mask``, and
                ``decoder_top_layer_state``, the query (defaults to the decoder output).

        Returns:
            ``HeadOutput`` with ``logits`` = log P (batch, tgt_len, vocab) in float32 (unnormalised
            in hard mode, see the module docstring), and with labels the loss and
            ``loss_terms = {"ce_tgt", "ce_src"}``.
        """
        surface = self.surface_states(self.query_states(decoder_hidden_states, context), context)
        target = decoder_hidden_states
        if self.ffn is not None:
            target, surface = self.ffn(target), self.ffn(surface)
        if self.target_proj is not None:
            target, surface = self.target_proj(target), self.source_proj(surface)
        log_probs, log_p_tgt, log_p_src = self.fuse(project(target).float(), project(surface).float(), target, surface)
        labels = context.labels
        if labels is None:
            if self.record_log_normaliser:
                self.last_log_normaliser = log_probs[:, -1].logsumexp(dim=-1)  # (batch,)
            return HeadOutput(logits=log_probs)
        loss, ce_tgt, ce_src = (
            log_prob_nll(log_p, labels, self.label_smoothing, context.num_items_in_batch)
            for log_p in (log_probs, log_p_tgt, log_p_src)
        )
        return HeadOutput(logits=log_probs, loss=loss, loss_terms={"ce_tgt": ce_tgt, "ce_src": ce_src})
