"""E2S2's data side: raw text -> two corrupted views of each text (or BART's one view).

Deviations from the official code, and why:

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
- Padding and special tokens (BOS/EOS/mask, which are never corrupted, so their label carries no
  information) get the denoising label -100; the official code labels padding "original".
- The noise of each text is seeded by (seed, epoch, the text's token ids): it does not depend on
  batch composition, DataLoader workers or resumption, so a resumed run sees exactly the noise an
  uninterrupted run would. Identical texts get identical noise within an epoch.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from hf_fusion.configuration_fusion_transformer import check_choice, check_positive_int, check_range

OBJECTIVES = ("e2s2", "bart")
# Denoising classes of the main view's tokens.
ORIGINAL, SHUFFLED, REPLACED = 0, 1, 2
IGNORE_INDEX = -100

# The five non-identity permutations of a trigram (the identity would shuffle nothing).
_TRIGRAM_PERMUTATIONS = np.array([[0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]])


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

    def boundary_tokens(self, text: str) -> int:
        """Number of special tokens the tokenizer puts around ``text`` (2 for BART's ``<s> ... </s>``,
        1 for ``... </s>``): what a block of ``max_length`` tokens leaves for content."""
        ids = self._tokenize([text])[0]
        return len(ids) - len(self._split(ids)[1])

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
