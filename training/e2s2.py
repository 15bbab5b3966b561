"""E2S2: encoder-side objectives for seq2seq pretraining, for any Hugging Face seq2seq LM.

Zhong et al., "E2S2: Encoding-Enhanced Sequence-to-Sequence Pretraining for Language
Understanding and Generation" (arXiv 2205.14912; official code: a fairseq fork, BART only).
Plain BART pretraining only supervises the decoder; E2S2 adds two losses on the encoder output:

    L = w·NLL(main) + w·NLL(second) + λ_de·L_de + λ_cl·L_cl        w = 0.5, λ_de = λ_cl = 0.05

Three pieces, all outside the model folder (seam 5 of hf_fusion: the corruption lives in the data
collator, the extra losses are reported as ``loss_terms`` beside the loss, the heads are dropped
for fine-tuning):

- :class:`E2S2DataCollator` turns raw text into two corrupted views of each text. The *second
  view* is BART span masking (a share ``mask_ratio`` of the tokens, span lengths ~ Poisson(λ),
  each span replaced by one mask token). The *main view* is the second view plus local trigram
  shuffling and random token replacement, with a per-token label original(0) / shuffled(1) /
  replaced(2). Both decoders reconstruct the original text. ``objective="bart"`` gives the plain
  BART baseline (span masking only, one view).
- :class:`E2S2ForPreTraining` wraps any seq2seq LM (an hf_fusion model, or a stock
  ``BartForConditionalGeneration``): a 3-way denoising head ``Linear(d, 3)`` after dropout on the
  final encoder output, and a SimCLR NT-Xent contrastive loss between the masked-mean-pooled,
  L2-normalised encoder outputs of the two views (in-batch negatives from both views).
  ``save_backbone`` exports the plain model; ``save_pretrained`` writes the same plain-model
  folder plus the head weights, so every checkpoint also loads directly for fine-tuning.
- :class:`E2S2Trainer` logs every loss term separately and checkpoints/resumes the wrapper.

Deviations from the official code, and why:
- The denoising loss trains all three classes. The official criterion passes the padding index
  (1) as ``ignore_index``, which silently drops the "shuffled" class, and labels padding as
  "original"; here padding and special tokens (BOS/EOS/mask, which are never corrupted, so their
  label carries no information) are -100.
- Mean pooling excludes padding (the official ``avg_pool1d`` averages over padded positions, so
  the sentence vector depends on the batch it is in).
- Losses are means: NLL per target token, L_de per labelled source token, L_cl per anchor (over
  both views, i.e. the symmetric average). The official sums are normalised by the number of
  target tokens in fairseq, which gives the same scales up to the source/target length ratio.
- Span placement: BART picks span starts uniformly and lets spans overlap or run into each other,
  so its realised masking rate drifts below the target. Here the sampled spans are placed without
  overlap (separated by at least one kept token, uniformly over all such placements), so exactly
  the sampled number of tokens is masked and each mask token stands for exactly one span.
  Zero-length spans insert a mask token, as in BART.
- Counts are stochastically rounded (floor plus a Bernoulli of the fraction) instead of BART's
  ``ceil``, so short sentences are not over-corrupted and the realised rates equal the configured
  ones on average.
- Local shuffling: one random centre per window of ``round(1 / shuffle_ratio)`` tokens, whose
  trigram is permuted by a non-identity permutation (the official code uses 18-token windows, a
  cap of 5% of the length, and may draw the identity; it also requires the centre to be a
  single-subword word, which needs word-boundary information a generic tokenizer does not give).
  Positions whose token actually moved are labelled "shuffled".
- Random replacement draws uniformly from the vocabulary minus special tokens and minus the
  original token (so a "replaced" label always marks a changed token) at a share
  ``replace_ratio`` of the ordinary tokens left unshuffled.
- The noise of each text is seeded by (seed, epoch, the text's token ids): it does not depend on
  batch composition, DataLoader workers or resumption, so a resumed run sees exactly the noise an
  uninterrupted run would. Identical texts get identical noise within an epoch.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from torch import nn
from transformers import AutoModelForSeq2SeqLM, PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainerCallback
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.utils import ModelOutput

from hf_fusion.configuration_fusion_transformer import check_choice, check_positive_int, check_range

OBJECTIVES = ("e2s2", "bart")
# Denoising classes of the main view's tokens.
ORIGINAL, SHUFFLED, REPLACED = 0, 1, 2
IGNORE_INDEX = -100
HEADS_WEIGHTS_NAME = "e2s2_heads.safetensors"
HEADS_CONFIG_NAME = "e2s2_config.json"

# The five non-identity permutations of a trigram (the identity would shuffle nothing).
_TRIGRAM_PERMUTATIONS = np.array([[0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]])


# --- corruption ------------------------------------------------------------------------------


def stochastic_round(value: float, rng: np.random.Generator) -> int:
    """``floor(value)`` plus one with probability ``value - floor(value)``: an unbiased integer."""
    base = math.floor(value)
    return base + int(rng.random() < value - base)


def sample_span_lengths(num_to_mask: int, poisson_lambda: float, rng: np.random.Generator) -> np.ndarray:
    """Poisson(λ) span lengths whose sum is exactly ``num_to_mask`` (BART: draw until the budget
    is reached, then trim the last span). Zero lengths are kept: they become inserted masks."""
    lengths = np.zeros(0, dtype=np.int64)
    while lengths.sum() < num_to_mask:
        lengths = np.concatenate([lengths, rng.poisson(poisson_lambda, size=num_to_mask)])
    cumulative = np.cumsum(lengths)
    last = int(np.searchsorted(cumulative, num_to_mask))  # first span reaching the budget
    lengths = lengths[: last + 1].copy()
    lengths[last] = num_to_mask - (cumulative[last - 1] if last > 0 else 0)
    return lengths


def poisson_span_mask(
    content: np.ndarray,
    rng: np.random.Generator,
    mask_ratio: float,
    poisson_lambda: float,
    mask_token_id: int,
    max_length: int,
) -> np.ndarray:
    """BART span masking of a 1-D array of content token ids (no BOS/EOS).

    A share ``mask_ratio`` of the tokens (stochastically rounded) is covered by spans with
    Poisson(λ) lengths; each span becomes ONE mask token, a zero-length span inserts one. Spans
    never overlap and are separated by at least one kept token. Inserted masks that would make
    the result longer than ``max_length``, or that find no free gap, are dropped.
    """
    num_tokens = len(content)
    num_to_mask = min(stochastic_round(mask_ratio * num_tokens, rng), num_tokens)
    if num_to_mask == 0:
        return content.copy()
    lengths = sample_span_lengths(num_to_mask, poisson_lambda, rng)
    spans = lengths[lengths > 0]
    num_kept = num_tokens - num_to_mask
    # Every span needs a kept token between it and the next one; the result must fit max_length.
    num_inserts = min(int((lengths == 0).sum()), num_kept + 1 - len(spans), max_length - num_kept - len(spans))
    spans = rng.permutation(np.concatenate([spans, np.zeros(max(num_inserts, 0), dtype=np.int64)]))

    # Distribute the kept tokens over the len(spans) + 1 gaps around the spans, interior gaps >= 1:
    # stars and bars over the tokens left after reserving one per interior gap.
    num_spans = len(spans)
    free = num_kept - (num_spans - 1)
    bars = np.sort(rng.choice(free + num_spans, size=num_spans, replace=False))
    gaps = np.diff(np.concatenate([[-1], bars, [free + num_spans]])) - 1  # (num_spans + 1,), sums to free
    gaps[1:-1] += 1

    pieces, position = [], 0
    for gap, length in zip(gaps[:-1], spans):
        pieces.append(content[position : position + gap])
        pieces.append(np.array([mask_token_id], dtype=content.dtype))
        position += gap + length
    pieces.append(content[position:])
    return np.concatenate(pieces)


def shuffle_trigrams(
    ids: np.ndarray, ordinary: np.ndarray, rng: np.random.Generator, shuffle_ratio: float
) -> tuple[np.ndarray, np.ndarray]:
    """Local shuffling: in each window of ``round(1 / shuffle_ratio)`` tokens pick one random
    centre and permute its trigram (non-identity), if all three tokens are ordinary (not special,
    not a mask) and not already part of a shuffled trigram.

    Returns the shuffled ids and a boolean array marking the positions whose token changed.
    """
    ids = ids.copy()
    shuffled = np.zeros(len(ids), dtype=bool)
    if shuffle_ratio == 0.0:
        return ids, shuffled
    touched = np.zeros(len(ids), dtype=bool)
    window = max(3, round(1.0 / shuffle_ratio))
    for start in range(0, len(ids), window):
        centre = start + int(rng.integers(min(window, len(ids) - start)))
        permutation = _TRIGRAM_PERMUTATIONS[rng.integers(len(_TRIGRAM_PERMUTATIONS))]
        trigram = slice(centre - 1, centre + 2)
        if centre < 1 or centre + 2 > len(ids) or not ordinary[trigram].all() or touched[trigram].any():
            continue
        original = ids[trigram].copy()
        ids[trigram] = original[permutation]
        shuffled[trigram] = ids[trigram] != original
        touched[trigram] = True
    return ids, shuffled


def replace_randomly(
    ids: np.ndarray, candidates: np.ndarray, rng: np.random.Generator, replace_ratio: float, vocabulary: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Replace a share ``replace_ratio`` of the ``candidates`` positions by random ids from the
    sorted array ``vocabulary``, never by the token already there.

    Returns the new ids and a boolean array marking the replaced positions.
    """
    ids = ids.copy()
    replaced = np.zeros(len(ids), dtype=bool)
    positions = np.flatnonzero(candidates)
    count = min(stochastic_round(replace_ratio * len(positions), rng), len(positions))
    if count == 0:
        return ids, replaced
    chosen = rng.choice(positions, size=count, replace=False)
    # Uniform over the vocabulary minus the original token: draw one of K - 1 slots, skip its slot.
    slots = rng.integers(len(vocabulary) - 1, size=count)
    slots += slots >= np.searchsorted(vocabulary, ids[chosen])
    ids[chosen] = vocabulary[slots]
    replaced[chosen] = True
    return ids, replaced


class E2S2DataCollator:
    """Raw text -> the two corrupted views of E2S2 (or BART's single view), padded into tensors.

    Args:
        tokenizer: Any HF tokenizer with a mask and a pad token. Texts are tokenized with its
            special tokens (e.g. ``<s> ... </s>``); the leading and trailing special tokens are
            kept intact, everything between them is content that may be corrupted.
        objective: ``"e2s2"`` (two views + denoising labels) or ``"bart"`` (span masking only).
        mask_ratio: Share of the content tokens covered by masked spans, in [0, 0.5].
        poisson_lambda: Mean span length λ > 0.
        shuffle_ratio: Share of tokens that are centres of a permuted trigram (main view only).
        replace_ratio: Share of the remaining ordinary tokens replaced by random ids (main view only).
        max_length: Texts are truncated to this many tokens (special tokens included).
        min_tokens: Texts with fewer content tokens are refused with a ValueError.
        text_column: Key of the text when features are mappings.
        seed: Seed of the noise; see :meth:`set_epoch`.
        pad_to_multiple_of: Pad the sequence length to a multiple of this (tensor-core friendly).

    Called with a list of texts (``str``, or mappings with ``text_column``), returns
    ``input_ids`` / ``attention_mask`` (main view, or BART's view), ``labels`` (the original
    token ids, -100 on padding) and for E2S2 also ``second_input_ids`` /
    ``second_attention_mask`` (the span-masked view) and ``denoising_labels`` (aligned with
    ``input_ids``: 0 original, 1 shuffled, 2 replaced, -100 on padding and special tokens). The two
    views of a text have the same length: shuffling and replacement preserve it.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        objective: str = "e2s2",
        mask_ratio: float = 0.15,
        poisson_lambda: float = 3.0,
        shuffle_ratio: float = 0.05,
        replace_ratio: float = 0.15,
        max_length: int = 512,
        min_tokens: int = 3,
        text_column: str = "text",
        seed: int = 0,
        pad_to_multiple_of: int | None = None,
    ):
        name = type(self).__name__
        check_choice(name, "objective", objective, OBJECTIVES)
        check_range(name, "mask_ratio", mask_ratio, 0.0, 0.5)
        check_range(name, "poisson_lambda", poisson_lambda, 0.0, None, low_inclusive=False)
        check_range(name, "shuffle_ratio", shuffle_ratio, 0.0, 1.0 / 3.0)
        check_range(name, "replace_ratio", replace_ratio, 0.0, 1.0)
        check_positive_int(name, "max_length", max_length)
        check_positive_int(name, "min_tokens", min_tokens)
        if pad_to_multiple_of is not None:
            check_positive_int(name, "pad_to_multiple_of", pad_to_multiple_of)
        for token in ("mask", "pad"):
            if getattr(tokenizer, f"{token}_token_id", None) is None:
                raise ValueError(
                    f"{name} needs a tokenizer with a {token} token, but {type(tokenizer).__name__}.{token}_token is "
                    f"None; add one (e.g. tokenizer.add_special_tokens({{'{token}_token': '<{token}>'}})) and resize "
                    "the model's embeddings."
                )
        self.tokenizer = tokenizer
        self.objective = objective
        self.mask_ratio = mask_ratio
        self.poisson_lambda = poisson_lambda
        self.shuffle_ratio = shuffle_ratio
        self.replace_ratio = replace_ratio
        self.max_length = max_length
        self.min_tokens = min_tokens
        self.text_column = text_column
        self.seed = seed
        self.pad_to_multiple_of = pad_to_multiple_of
        self.epoch = 0
        self.mask_token_id = tokenizer.mask_token_id
        self.pad_token_id = tokenizer.pad_token_id
        self.special_ids = np.array(sorted(set(tokenizer.all_special_ids)), dtype=np.int64)
        # Ids a random replacement may draw: the whole vocabulary except special tokens.
        self.vocabulary = np.setdiff1d(np.arange(len(tokenizer), dtype=np.int64), self.special_ids)
        if len(self.vocabulary) < 2:
            raise ValueError(f"{name} needs a tokenizer with at least 2 ordinary tokens, got {len(self.vocabulary)}.")

    def set_epoch(self, epoch: int) -> None:
        """Use the noise of ``epoch`` (the same text gets new noise every epoch);
        :class:`E2S2Trainer` calls this at the start of each epoch."""
        self.epoch = epoch

    def content_lengths(self, texts: Sequence[str]) -> list[int]:
        """Number of content (non-boundary-special) tokens of each text after truncation, e.g. to
        filter a corpus with ``length >= min_tokens`` before training."""
        return [len(self._split(ids)[1]) for ids in self._tokenize(texts)]

    def __call__(self, features: Sequence[str | Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        texts = [self._text_of(feature, index) for index, feature in enumerate(features)]
        examples = [self._corrupt(ids, index) for index, ids in enumerate(self._tokenize(texts))]
        batch = {
            "input_ids": self._pad([e["input_ids"] for e in examples], self.pad_token_id),
            "attention_mask": self._pad([np.ones_like(e["input_ids"]) for e in examples], 0),
            "labels": self._pad([e["labels"] for e in examples], IGNORE_INDEX),
        }
        if self.objective == "e2s2":
            batch["second_input_ids"] = self._pad([e["second_input_ids"] for e in examples], self.pad_token_id)
            batch["second_attention_mask"] = self._pad([np.ones_like(e["second_input_ids"]) for e in examples], 0)
            batch["denoising_labels"] = self._pad([e["denoising_labels"] for e in examples], IGNORE_INDEX)
        return batch

    def _text_of(self, feature: str | Mapping[str, Any], index: int) -> str:
        text = feature[self.text_column] if isinstance(feature, Mapping) else feature
        if not isinstance(text, str):
            raise ValueError(f"Example {index} of the batch is a {type(text).__name__}, expected a string of text.")
        if not text.strip():
            raise ValueError(f"Example {index} of the batch is an empty text; drop empty lines before training.")
        return text

    def _tokenize(self, texts: Sequence[str]) -> list[np.ndarray]:
        encoded = self.tokenizer(list(texts), add_special_tokens=True, truncation=True, max_length=self.max_length)
        return [np.asarray(ids, dtype=np.int64) for ids in encoded["input_ids"]]

    def _split(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(leading special tokens, content, trailing special tokens)."""
        special = np.isin(ids, self.special_ids)
        start = int(np.argmin(special)) if not special.all() else len(ids)
        end = len(ids) - int(np.argmin(special[::-1])) if not special.all() else len(ids)
        return ids[:start], ids[start:end], ids[end:]

    def _rng(self, ids: np.ndarray) -> np.random.Generator:
        """Noise generator of one text: seeded by (seed, epoch, the text's token ids)."""
        digest = int.from_bytes(hashlib.blake2b(ids.tobytes(), digest_size=8).digest(), "little")
        return np.random.default_rng([self.seed, self.epoch, digest])

    def _corrupt(self, ids: np.ndarray, index: int) -> dict[str, np.ndarray]:
        prefix, content, suffix = self._split(ids)
        if len(content) < self.min_tokens:
            raise ValueError(
                f"Example {index} of the batch has {len(content)} content token(s) but "
                f"{type(self).__name__}.min_tokens = {self.min_tokens}; filter short texts out "
                "(see E2S2DataCollator.content_lengths)."
            )
        rng = self._rng(ids)
        masked = poisson_span_mask(
            content, rng, self.mask_ratio, self.poisson_lambda, self.mask_token_id, self.max_length - len(prefix) - len(suffix)
        )
        second = np.concatenate([prefix, masked, suffix])
        if self.objective == "bart":
            return {"input_ids": second, "labels": ids}
        ordinary = ~np.isin(second, self.special_ids)
        main, shuffled = shuffle_trigrams(second, ordinary, rng, self.shuffle_ratio)
        main, replaced = replace_randomly(main, ordinary & ~shuffled, rng, self.replace_ratio, self.vocabulary)
        denoising_labels = np.where(ordinary, ORIGINAL, IGNORE_INDEX)
        denoising_labels[shuffled] = SHUFFLED
        denoising_labels[replaced] = REPLACED
        return {"input_ids": main, "second_input_ids": second, "denoising_labels": denoising_labels, "labels": ids}

    def _pad(self, rows: list[np.ndarray], value: int) -> torch.Tensor:
        length = max(len(row) for row in rows)
        if self.pad_to_multiple_of:
            length = math.ceil(length / self.pad_to_multiple_of) * self.pad_to_multiple_of
        out = torch.full((len(rows), length), value, dtype=torch.long)  # (batch, padded_len)
        for row_idx, row in enumerate(rows):
            out[row_idx, : len(row)] = torch.from_numpy(row)
        return out


# --- losses ----------------------------------------------------------------------------------


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


def denoising_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of ``(batch, seq_len, 3)`` logits over the labelled positions (zero if none)."""
    labels = labels.reshape(-1).to(logits.device)
    if not (labels != IGNORE_INDEX).any():
        return logits.sum() * 0.0
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels, ignore_index=IGNORE_INDEX)


# --- model wrapper ---------------------------------------------------------------------------


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
        head_dropout: float | None = None,
    ):
        super().__init__()
        name = type(self).__name__
        for field, value in (("lambda_de", lambda_de), ("lambda_cl", lambda_cl), ("nll_weight", nll_weight)):
            check_range(name, field, value, 0.0, None)
        check_range(name, "temperature", temperature, 0.0, None, low_inclusive=False)
        if head_dropout is None:
            head_dropout = float(getattr(backbone.config, "dropout", 0.0))
        check_range(name, "head_dropout", head_dropout, 0.0, 1.0, high_inclusive=False)
        self.backbone = backbone
        self.lambda_de = lambda_de
        self.lambda_cl = lambda_cl
        self.temperature = temperature
        self.nll_weight = nll_weight
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
        loss_de = denoising_loss(denoising_logits, denoising_labels)
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


# --- training --------------------------------------------------------------------------------


class NoiseEpochCallback(TrainerCallback):
    """Tells the collator which epoch starts, so every epoch draws fresh noise (and a resumed run
    draws the noise of the epoch it resumes in)."""

    def __init__(self, collator: E2S2DataCollator):
        self.collator = collator

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.collator.set_epoch(int(state.epoch or 0))


class E2S2Trainer(Trainer):
    """``Trainer`` that logs each of the model's ``loss_terms`` beside the loss and checkpoints
    :class:`E2S2ForPreTraining` as a plain-backbone folder plus the heads.

    Works unchanged for a plain seq2seq model (the BART baseline, or an hf_fusion model whose head
    reports terms). Training logs carry each term averaged over the logging interval (and over
    processes). FSDP/DeepSpeed state-dict gathering is not supported for the wrapper.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._term_sums: dict[str, torch.Tensor] = {}
        self._term_calls = 0
        if isinstance(self.data_collator, E2S2DataCollator):
            self.add_callback(NoiseEpochCallback(self.data_collator))
        if self._is_e2s2_model() and self.args.load_best_model_at_end:
            raise ValueError("E2S2Trainer does not support load_best_model_at_end with E2S2ForPreTraining; set it to False.")

    def _is_e2s2_model(self) -> bool:
        return isinstance(self.accelerator.unwrap_model(self.model), E2S2ForPreTraining)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        terms = outputs.get("loss_terms") if isinstance(outputs, Mapping) else None
        if terms and model.training:
            for name, value in terms.items():
                self._term_sums[name] = self._term_sums.get(name, 0.0) + value.detach().float()
            self._term_calls += 1
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._term_calls:
            names = sorted(self._term_sums)
            means = torch.stack([self._term_sums[name] for name in names]) / self._term_calls
            means = self.accelerator.reduce(means, reduction="mean")
            logs.update({name: round(value, 4) for name, value in zip(names, means.tolist())})
            self._term_sums, self._term_calls = {}, 0
        super().log(logs, start_time)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if not self._is_e2s2_model():
            return super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        self.accelerator.unwrap_model(self.model).save_pretrained(output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        target = self.accelerator.unwrap_model(model if model is not None else self.model)
        if not isinstance(target, E2S2ForPreTraining):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        target.load_checkpoint(resume_from_checkpoint)


__all__ = [
    "E2S2DataCollator",
    "E2S2ForPreTraining",
    "E2S2Output",
    "E2S2Trainer",
    "NoiseEpochCallback",
    "masked_mean_pool",
    "nt_xent_loss",
    "denoising_loss",
    "poisson_span_mask",
    "shuffle_trigrams",
    "replace_randomly",
]
