"""Seam 4, the output head: top decoder state (and encoder outputs) -> logits and loss.

The tied projection ``E h + b`` (``lm_head`` + ``final_logits_bias``, BART's checkpoint keys) is
owned by the model and handed to the head as ``project``, so a head that needs the shared output
embedding (SurfaceFusion) uses the very same weights. A head also defines the training loss,
because a head that mixes several distributions needs a loss over them, and reports any loss
components in ``loss_terms`` (seam 5, logged beside the loss).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from .configuration_fusion_transformer import FusionTransformerConfig


def log_prob_nll(
    log_probs: torch.Tensor,
    labels: torch.Tensor,
    label_smoothing: float = 0.0,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Label-smoothed negative log-likelihood of given log-probabilities, fairseq's
    ``label_smoothed_nll_loss``: per target token (1 - eps) * -log P(y) + eps * mean_v(-log P(v)).

    It does not log-softmax its input, so a head can train on an unnormalised mixture (hard
    SurfaceFusion does). Labels of -100 are ignored; the sum is divided by the
    number of target tokens, or by ``num_items_in_batch`` under gradient accumulation.

    Args:
        log_probs: (batch, tgt_len, vocab) log-probabilities, normalised or not.
        labels: (batch, tgt_len) target ids, -100 where ignored.
    """
    keep = labels != -100  # (batch, tgt_len)
    targets = labels.clamp(min=0).unsqueeze(-1).to(log_probs.device)  # (batch, tgt_len, 1)
    nll = -log_probs.gather(-1, targets).squeeze(-1)
    smooth = -log_probs.mean(dim=-1)
    per_token = ((1.0 - label_smoothing) * nll + label_smoothing * smooth).masked_fill(~keep.to(nll.device), 0.0)
    return per_target_token(per_token.sum(), keep, num_items_in_batch)


def per_target_token(
    total: torch.Tensor, keep: torch.Tensor, num_items_in_batch: int | torch.Tensor | None
) -> torch.Tensor:
    """A summed loss divided by the number of target tokens (``keep``: the labels that count), or
    by ``num_items_in_batch`` under gradient accumulation."""
    denominator = keep.sum() if num_items_in_batch is None else num_items_in_batch
    if isinstance(denominator, torch.Tensor):
        denominator = denominator.to(total.device)
    return total / denominator


def token_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    label_smoothing: float = 0.0,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Label-smoothed cross-entropy over ``(batch, tgt_len, vocab)`` logits, ignoring labels of
    -100: :func:`log_prob_nll` of their log-softmax (computed in float32).

    With ``num_items_in_batch`` (passed by the Trainer under gradient accumulation) the sum is
    divided by the number of target tokens of the whole accumulated batch, so accumulation gives
    the same gradient as one large batch.

    Computed by PyTorch's fused ``cross_entropy``, whose label smoothing is the same
    (1 - eps) * NLL + eps * mean_v(-log P(v)) per token: one kernel instead of a log-softmax, a
    gather and a mean over the vocabulary, which the training step pays on every token.
    """
    labels = labels.to(logits.device)
    total = nn.functional.cross_entropy(
        logits.float().flatten(0, -2), labels.flatten(), ignore_index=-100, reduction="sum",
        label_smoothing=label_smoothing,
    )
    return per_target_token(total, labels != -100, num_items_in_batch)


# Seam 5: named components of a loss (e.g. SurfaceFusion's ce_tgt / ce_src), still attached to the
# graph, reported beside the loss so training tools can log them.
LossTerms = dict[str, torch.Tensor]


@dataclass
class HeadContext:
    """Everything an output head may read besides the decoder output, in one object so that each
    head takes what it needs by name and a new head needs no new call signature.

    Args:
        labels: (batch, tgt_len) target ids, -100 where ignored; ``None`` at inference.
        num_items_in_batch: Target tokens of the whole accumulated batch (from the Trainer).
        decoder_top_layer_state: (batch, tgt_len, d_model) last decoder step's state before the
            stack's final LayerNorm.
        decoder_step_states: the decoder's embedding output and each step's state (index k + 1 =
            after step k), each (batch, tgt_len, d_model), before the final LayerNorm.
        encoder_hidden_states: (batch, src_len, d_model) the encoder output X^N.
        encoder_token_embeddings: (batch, src_len, d_model) scaled source token embeddings
            without positions; ``None`` when the caller passed hand-made encoder outputs.
        encoder_attention_mask: (batch, src_len) source padding mask, 1 for tokens.
    """

    labels: torch.Tensor | None = None
    num_items_in_batch: int | torch.Tensor | None = None
    decoder_top_layer_state: torch.Tensor | None = None
    decoder_step_states: tuple[torch.Tensor, ...] | None = None
    encoder_hidden_states: torch.Tensor | None = None
    encoder_token_embeddings: torch.Tensor | None = None
    encoder_attention_mask: torch.Tensor | None = None


@dataclass
class HeadOutput:
    """What a head returns: logits for generation, and the loss with its components when labels
    were given."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None
    loss_terms: LossTerms = field(default_factory=dict)


class LMHead(nn.Module):
    """Vanilla output head: ``logits = E h + b`` on the top decoder state, cross-entropy loss."""

    def __init__(self, config: FusionTransformerConfig):
        super().__init__()
        self.label_smoothing = config.label_smoothing

    def forward(
        self,
        project: Callable[[torch.Tensor], torch.Tensor],
        decoder_hidden_states: torch.Tensor,
        context: HeadContext,
    ) -> HeadOutput:
        """Args:
            project: The tied output projection, (..., d_model) -> (..., vocab).
            decoder_hidden_states: (batch, tgt_len, d_model), the decoder's final output.
            context: Labels and loss normalisation (the encoder side is unused by this head).
        """
        logits = project(decoder_hidden_states)
        loss = None
        if context.labels is not None:
            loss = token_cross_entropy(logits, context.labels, self.label_smoothing, context.num_items_in_batch)
        return HeadOutput(logits=logits, loss=loss)
