"""E2S2's model side: the denoising head, the contrastive loss and the wrapper that saves as the
plain backbone.

Deviations from the official code, and why:

- The denoising loss trains all three classes by default (``denoising_classes=3``). The official
  criterion passes the padding index (1) as ``ignore_index``, which silently drops the "shuffled"
  class (its label is also 1): positions of shuffled tokens contribute nothing, and the 3-way
  softmax only ever learns original vs replaced. ``denoising_classes=2`` reproduces that effective
  objective exactly (shuffled positions leave the loss and its normaliser; the head keeps its 3
  outputs, as the official head does), so a reproduction of the authors' runs can choose it.
  Padding and special tokens are -100 either way (marked by the collator).
- Mean pooling excludes padding (the official ``avg_pool1d`` averages over padded positions, so
  the sentence vector depends on the batch it is in).
- Losses are means: NLL per target token, L_de per labelled source token, L_cl per anchor (over
  both views, i.e. the symmetric average). The official sums are normalised by the number of
  target tokens in fairseq, which gives the same scales up to the source/target length ratio.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
from torch import nn
from transformers import AutoModelForSeq2SeqLM, PreTrainedModel
from transformers.utils import ModelOutput

from hf_fusion.configuration_fusion_transformer import check_choice, check_range

from .collator import IGNORE_INDEX, SHUFFLED

# ``denoising_classes``: 3 trains original/shuffled/replaced; 2 is the official code's effective
# objective, where the ignore index also drops every "shuffled" position.
DENOISING_CLASSES = (3, 2)

HEADS_WEIGHTS_NAME = "e2s2_heads.safetensors"
HEADS_CONFIG_NAME = "e2s2_config.json"


def masked_mean_pool(hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``(batch, seq_len, d)`` states over the positions where ``attention_mask`` is 1,
    so padding never changes a sentence vector. Returns ``(batch, d)``."""
    mask = attention_mask.to(hidden_states.dtype).unsqueeze(-1)  # (batch, seq_len, 1)
    return (hidden_states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


def nt_xent_loss(first: torch.Tensor, second: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """SimCLR's NT-Xent between two views, ``(batch, d)`` each, row i of both = one text.

    The 2·batch vectors are L2-normalised; each one's positive is the other view of its text, its
    negatives are the other 2·batch - 2 vectors of both views. The loss is the mean over all
    2·batch anchors, i.e. symmetric in the two views.
    """
    batch = first.shape[0]
    vectors = nn.functional.normalize(torch.cat([first, second]).float(), dim=-1)  # (2·batch, d)
    similarity = vectors @ vectors.T / temperature  # (2·batch, 2·batch)
    self_pairs = torch.eye(2 * batch, dtype=torch.bool, device=similarity.device)
    similarity = similarity.masked_fill(self_pairs, float("-inf"))
    positives = torch.cat([torch.arange(batch, 2 * batch), torch.arange(batch)]).to(similarity.device)
    return nn.functional.cross_entropy(similarity, positives)


def denoising_loss(logits: torch.Tensor, labels: torch.Tensor, classes: int = 3) -> torch.Tensor:
    """Cross-entropy of ``(batch, seq_len, 3)`` logits over the labelled positions (zero if none).

    ``classes=2`` also leaves out the positions labelled "shuffled" (the official code's effective
    objective, see the module docstring); the softmax still runs over all 3 logits.
    """
    labels = labels.reshape(-1).to(logits.device)
    if classes == 2:
        labels = labels.masked_fill(labels == SHUFFLED, IGNORE_INDEX)
    if not (labels != IGNORE_INDEX).any():
        return logits.sum() * 0.0
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels, ignore_index=IGNORE_INDEX)


@dataclass
class E2S2Output(ModelOutput):
    """Output of :class:`E2S2ForPreTraining`.

    Args:
        loss: The weighted total.
        loss_terms: Every unweighted term: ``nll_main``, ``nll_second``, ``denoising``,
            ``contrastive`` (plus the backbone's own terms, prefixed ``main/`` and ``second/``).
        logits: ``(batch, tgt_len, vocab)`` decoder logits of the main view.
        denoising_logits: ``(batch, src_len, 3)`` logits of the token classifier on the main view.
        sentence_embeddings: ``(2, batch, d)`` L2-normalised pooled encoder outputs of the main and
            the second view.
    """

    loss: torch.Tensor | None = None
    loss_terms: dict[str, torch.Tensor] | None = None
    logits: torch.Tensor | None = None
    denoising_logits: torch.Tensor | None = None
    sentence_embeddings: torch.Tensor | None = None


class E2S2ForPreTraining(nn.Module):
    """Any seq2seq LM plus E2S2's encoder-side heads and losses.

    The backbone must take ``input_ids``, ``attention_mask`` and ``labels`` and return ``loss``
    and ``encoder_last_hidden_state`` (every hf_fusion model and every HF encoder-decoder LM
    does). Its loss is the NLL of a view; an hf_fusion head's own ``loss_terms`` are passed on.

    Args:
        backbone: The seq2seq LM being pretrained.
        lambda_de: Weight of the token-level denoising loss (≥ 0).
        lambda_cl: Weight of the contrastive loss (≥ 0).
        temperature: NT-Xent temperature τ (> 0).
        nll_weight: Weight w of each of the two NLL terms (≥ 0; the official code uses 0.5).
        denoising_classes: 3 (default) trains the denoising head on original / shuffled / replaced;
            2 reproduces the official code, whose ignore index drops the "shuffled" positions.
        head_dropout: Dropout before the denoising head; ``None`` takes the backbone's
            ``config.dropout``.
    """

    # The losses are means per batch: let the Trainer scale them for gradient accumulation.
    accepts_loss_kwargs = False

    def __init__(
        self,
        backbone: PreTrainedModel,
        lambda_de: float = 0.05,
        lambda_cl: float = 0.05,
        temperature: float = 1.0,
        nll_weight: float = 0.5,
        denoising_classes: int = 3,
        head_dropout: float | None = None,
    ):
        super().__init__()
        name = type(self).__name__
        for field, value in (("lambda_de", lambda_de), ("lambda_cl", lambda_cl), ("nll_weight", nll_weight)):
            check_range(name, field, value, 0.0, None)
        check_range(name, "temperature", temperature, 0.0, None, low_inclusive=False)
        check_choice(name, "denoising_classes", denoising_classes, DENOISING_CLASSES)
        if head_dropout is None:
            head_dropout = float(getattr(backbone.config, "dropout", 0.0))
        check_range(name, "head_dropout", head_dropout, 0.0, 1.0, high_inclusive=False)
        self.backbone = backbone
        self.lambda_de = lambda_de
        self.lambda_cl = lambda_cl
        self.temperature = temperature
        self.nll_weight = nll_weight
        self.denoising_classes = denoising_classes
        self.head_dropout = head_dropout
        width = backbone.get_input_embeddings().embedding_dim
        self.denoising_dropout = nn.Dropout(head_dropout)
        self.denoising_head = nn.Linear(width, 3)
        nn.init.normal_(self.denoising_head.weight, std=float(getattr(backbone.config, "init_std", 0.02)))
        nn.init.zeros_(self.denoising_head.bias)

    @property
    def config(self):
        """The backbone's config (what the Trainer and users look for on a model)."""
        return self.backbone.config

    def hparams(self) -> dict[str, float]:
        """The wrapper's hyper-parameters, as saved next to the head weights."""
        return {
            "lambda_de": self.lambda_de,
            "lambda_cl": self.lambda_cl,
            "temperature": self.temperature,
            "nll_weight": self.nll_weight,
            "denoising_classes": self.denoising_classes,
            "head_dropout": self.head_dropout,
        }

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        second_input_ids: torch.Tensor,
        second_attention_mask: torch.Tensor,
        denoising_labels: torch.Tensor,
    ) -> E2S2Output:
        """Args:
            input_ids / attention_mask: ``(batch, src_len)`` main view (masked, shuffled, replaced).
            labels: ``(batch, tgt_len)`` the original text, -100 on padding; both views decode it.
            second_input_ids / second_attention_mask: ``(batch, src_len2)`` the span-masked view.
            denoising_labels: ``(batch, src_len)`` 0/1/2 per main-view token, -100 where ignored.
        """
        main = self.backbone(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        second = self.backbone(input_ids=second_input_ids, attention_mask=second_attention_mask, labels=labels)

        denoising_logits = self.denoising_head(self.denoising_dropout(main.encoder_last_hidden_state))  # (batch, src_len, 3)
        loss_de = denoising_loss(denoising_logits, denoising_labels, self.denoising_classes)
        pooled_main = masked_mean_pool(main.encoder_last_hidden_state, attention_mask)  # (batch, d)
        pooled_second = masked_mean_pool(second.encoder_last_hidden_state, second_attention_mask)
        loss_cl = nt_xent_loss(pooled_main, pooled_second, self.temperature)

        loss = (
            self.nll_weight * (main.loss + second.loss) + self.lambda_de * loss_de + self.lambda_cl * loss_cl
        )
        terms = {"nll_main": main.loss, "nll_second": second.loss, "denoising": loss_de, "contrastive": loss_cl}
        for view, output in (("main", main), ("second", second)):
            for term, value in (output.get("loss_terms") or {}).items():
                terms[f"{view}/{term}"] = value
        embeddings = nn.functional.normalize(torch.stack([pooled_main, pooled_second]), dim=-1)  # (2, batch, d)
        return E2S2Output(
            loss=loss,
            loss_terms=terms,
            logits=main.logits,
            denoising_logits=denoising_logits,
            sentence_embeddings=embeddings,
        )

    def activation_checkpointing_enable(self, **kwargs) -> None:
        """Checkpoint the backbone's layers (the heads are a single Linear). The name the Trainer
        calls from transformers 5.23 on (``gradient_checkpointing_enable`` is deprecated)."""
        self.backbone.activation_checkpointing_enable(**kwargs)

    # --- saving and loading ----------------------------------------------------------------

    def save_backbone(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """Export the plain backbone for fine-tuning: the pretraining heads are dropped and the
        folder loads with ``AutoModelForSeq2SeqLM.from_pretrained`` (hf_fusion models with
        ``trust_remote_code=True`` where hf_fusion is not installed). ``use_cache`` is saved on,
        whatever training set it to."""
        config = self.backbone.config
        use_cache = getattr(config, "use_cache", None)
        config.use_cache = True
        try:
            self.backbone.save_pretrained(save_directory, **kwargs)
        finally:
            config.use_cache = use_cache

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """The plain backbone folder (see :meth:`save_backbone`) plus the head weights and the
        wrapper's hyper-parameters, so the same folder both fine-tunes and resumes pretraining."""
        self.save_backbone(save_directory, **kwargs)
        safetensors.torch.save_file(
            {name: tensor.contiguous() for name, tensor in self.denoising_head.state_dict().items()},
            os.path.join(save_directory, HEADS_WEIGHTS_NAME),
        )
        Path(save_directory, HEADS_CONFIG_NAME).write_text(json.dumps(self.hparams(), indent=2) + "\n")

    def load_checkpoint(self, checkpoint: str | os.PathLike) -> None:
        """Load backbone and head weights written by :meth:`save_pretrained` into this wrapper."""
        heads_file = os.path.join(checkpoint, HEADS_WEIGHTS_NAME)
        if not os.path.isfile(heads_file):
            raise ValueError(f"{checkpoint} has no {HEADS_WEIGHTS_NAME}: it is not an E2S2 pretraining checkpoint.")
        # from_pretrained resolves shards, tied weights and renamed keys; copy into our own modules.
        loaded = type(self.backbone).from_pretrained(checkpoint)
        self.backbone.load_state_dict(loaded.state_dict())
        self.denoising_head.load_state_dict(safetensors.torch.load_file(heads_file))

    @classmethod
    def from_pretrained(cls, checkpoint: str | os.PathLike, **backbone_kwargs) -> E2S2ForPreTraining:
        """Rebuild a wrapper saved by :meth:`save_pretrained`; ``backbone_kwargs`` go to
        ``AutoModelForSeq2SeqLM.from_pretrained`` (e.g. ``trust_remote_code=True``)."""
        config_file = os.path.join(checkpoint, HEADS_CONFIG_NAME)
        if not os.path.isfile(config_file):
            raise ValueError(f"{checkpoint} has no {HEADS_CONFIG_NAME}: it is not an E2S2 pretraining checkpoint.")
        model = cls(AutoModelForSeq2SeqLM.from_pretrained(checkpoint, **backbone_kwargs), **json.loads(Path(config_file).read_text()))
        model.denoising_head.load_state_dict(safetensors.torch.load_file(os.path.join(checkpoint, HEADS_WEIGHTS_NAME)))
        return model
