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

import torch
from torch import nn

from .configuration_fusion_transformer import FusionTransformerConfig


def token_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    label_smoothing: float = 0.0,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy over ``(batch, tgt_len, vocab)`` logits, ignoring labels of -100.

    With ``num_items_in_batch`` (passed by the Trainer under gradient accumulation) the sum is
    divided by the number of target tokens of the whole accumulated batch, so accumulation gives
    the same gradient as one large batch.
    """
    logits = logits.reshape(-1, logits.shape[-1]).float()
    labels = labels.reshape(-1).to(logits.device)
    if num_items_in_batch is None:
        return nn.functional.cross_entropy(logits, labels, ignore_index=-100, label_smoothing=label_smoothing)
    total = nn.functional.cross_entropy(
        logits, labels, ignore_index=-100, label_smoothing=label_smoothing, reduction="sum"
    )
    if isinstance(num_items_in_batch, torch.Tensor):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


@dataclass
class HeadOutput:
    """What a head returns: logits for generation, and the loss with its components when labels
    were given."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None
    loss_terms: dict[str, torch.Tensor] = field(default_factory=dict)


class LMHead(nn.Module):
    """Vanilla output head: ``logits = E h + b`` on the top decoder state, cross-entropy loss."""

    def __init__(self, config: FusionTransformerConfig):
        super().__init__()
        self.label_smoothing = config.label_smoothing

    def forward(
        self,
        project: Callable[[torch.Tensor], torch.Tensor],
        decoder_hidden_states: torch.Tensor,
        labels: torch.Tensor | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        **encoder_context,
    ) -> HeadOutput:
        """Args:
            project: The tied output projection, (..., d_model) -> (..., vocab).
            decoder_hidden_states: (batch, tgt_len, d_model), the decoder's final output.
            labels: (batch, tgt_len) target ids, -100 where ignored.
            encoder_context: encoder outputs and caches, unused by this head.
        """
        logits = project(decoder_hidden_states)
        loss = None
        if labels is not None:
            loss = token_cross_entropy(logits, labels, self.label_smoothing, num_items_in_batch)
        return HeadOutput(logits=logits, loss=loss)
