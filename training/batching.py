"""Feeding a seq2seq model without wasting the CPU: tokenize once, batch by length, pad to the batch.

Measured on the Ding corpus (see ``benchmarks/pipeline_throughput.py``), Hugging Face's default
seq2seq pipeline spends much of each step on work that does not train the model:

- random batches of short sentences are padded to their longest member, so a batch of 64
  sentences of mean length 14 carries 30-40 positions per row: most of the compute is on padding;
- ``DataCollatorForSeq2Seq`` pads through the tokenizer, row by row, in Python, every step.

What this module does instead, as fairseq does:

- :func:`tokenize_pairs` tokenizes every split once with ``datasets.map`` (cached on disk by the
  datasets fingerprint, so a second run or a second process reuses it);
- :class:`TokenizedPairs` holds the ids as two flat int32 arrays plus offsets, read straight from
  the Arrow columns, so fetching an example is two array slices;
- :class:`LengthBucketBatchSampler` sorts by length and cuts batches under a *token budget*
  (``max_tokens``: batch rows x longest row) or a fixed number of rows, so a batch holds sentences
  of nearly equal length; the batches are fixed for a seed and their *order* is shuffled every
  epoch (deterministically from ``seed + epoch``, which is what exact resumption needs);
- :class:`PairCollator` pads with numpy to the longest row of the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import torch

SOURCE_IDS = "input_ids"
TARGET_IDS = "labels"
LABEL_PAD = -100


def tokenize_pairs(
    splits: datasets.DatasetDict,
    tokenizer: Any,
    max_source_length: int,
    max_target_length: int,
    num_proc: int | None = None,
) -> datasets.DatasetDict:
    """Tokenize the ``source``/``target`` columns of every split into ``input_ids``/``labels``.

    Truncates to ``max_source_length`` / ``max_target_length`` tokens (special tokens included).
    The result is cached by ``datasets`` (the fingerprint covers the tokenizer and the lengths).
    """

    def encode(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
        source = tokenizer(batch["source"], truncation=True, max_length=max_source_length)["input_ids"]
        target = tokenizer(text_target=batch["target"], truncation=True, max_length=max_target_length)["input_ids"]
        return {SOURCE_IDS: source, TARGET_IDS: target}

    return datasets.DatasetDict(
        {
            name: split.map(
                encode,
                batched=True,
                batch_size=2000,
                num_proc=num_proc,
                remove_columns=split.column_names,
                desc=f"Tokenizing {name}",
            )
            for name, split in splits.items()
        }
    )


def _flat_list_column(table: pa.Table, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(values, offsets) of a list<int> Arrow column: row i is ``values[offsets[i]:offsets[i+1]]``."""
    column = table.column(name).combine_chunks()
    offsets = column.offsets.to_numpy()
    values = column.values.to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
    return values, (offsets - offsets[0]).astype(np.int64)


class TokenizedPairs(torch.utils.data.Dataset):
    """Token ids of (source, target) pairs as flat int32 arrays + offsets (fairseq's indexed layout).

    Items are ``{"input_ids": int32 array, "labels": int32 array}``; ``labels`` is absent when the
    dataset has no targets. ``source_lengths`` / ``target_lengths`` feed the length-bucketing sampler.
    """

    def __init__(self, source: tuple[np.ndarray, np.ndarray], target: tuple[np.ndarray, np.ndarray] | None):
        self._source_values, self._source_offsets = source
        self._target_values, self._target_offsets = target if target is not None else (None, None)
        self.source_lengths = np.diff(self._source_offsets)
        self.target_lengths = np.diff(self._target_offsets) if target is not None else np.zeros_like(self.source_lengths)

    @classmethod
    def from_dataset(cls, dataset: datasets.Dataset) -> TokenizedPairs:
        """Wrap the output of :func:`tokenize_pairs` (one split)."""
        table = dataset.with_format("arrow")[:]
        source = _flat_list_column(table, SOURCE_IDS)
        target = _flat_list_column(table, TARGET_IDS) if TARGET_IDS in table.column_names else None
        return cls(source, target)

    def __len__(self) -> int:
        return len(self.source_lengths)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        start, end = self._source_offsets[index], self._source_offsets[index + 1]
        item = {SOURCE_IDS: self._source_values[start:end]}
        if self._target_values is not None:
            start, end = self._target_offsets[index], self._target_offsets[index + 1]
            item[TARGET_IDS] = self._target_values[start:end]
        return item

    def select(self, indices: Sequence[int]) -> TokenizedPairs:
        """A new dataset holding the given examples in the given order."""
        indices = np.asarray(indices, dtype=np.int64)

        def gather(values: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            lengths = np.diff(offsets)[indices]
            new_offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
            rows = [values[offsets[i] : offsets[i + 1]] for i in indices]
            return (np.concatenate(rows) if rows else values[:0]), new_offsets

        source = gather(self._source_values, self._source_offsets)
        target = gather(self._target_values, self._target_offsets) if self._target_values is not None else None
        return TokenizedPairs(source, target)

    def length_sorted_order(self) -> np.ndarray:
        """Indices from the longest to the shortest source (ties: longer target first).

        Generation over length-sorted batches wastes almost no compute on padding, and putting the
        longest batch first makes an out-of-memory error happen at once rather than at the end.
        """
        return np.lexsort((-self.target_lengths, -self.source_lengths))


class LengthBucketBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of examples of nearly equal length, under a token budget and/or a row limit.

    The examples are sorted by (source length, target length), ties broken at random from
    ``seed``, and cut greedily into batches whose padded size ``rows x max(longest source, longest
    target)`` stays within ``max_tokens`` and whose row count stays within ``max_rows``. The
    batches are fixed once (so the number of steps per epoch is fixed, as the Trainer's schedule
    and resumption need); every epoch shuffles their order with ``seed + epoch``.

    Args:
        source_lengths / target_lengths: Token counts per example.
        max_tokens: Token budget of one batch, counting padding; ``None`` for no budget.
        max_rows: Most examples in one batch; ``None`` for no limit (needs ``max_tokens``).
        seed: Seed of the tie-breaking and of the per-epoch shuffles.
        shuffle: Shuffle the batch order every epoch (training) or keep it sorted (evaluation).
    """

    def __init__(
        self,
        source_lengths: np.ndarray,
        target_lengths: np.ndarray,
        max_tokens: int | None,
        max_rows: int | None,
        seed: int = 0,
        shuffle: bool = True,
    ):
        if max_tokens is None and max_rows is None:
            raise ValueError("LengthBucketBatchSampler needs max_tokens, max_rows or both.")
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.batch_size = None  # batches have varying sizes (accelerate reads this attribute)
        widths = np.maximum(source_lengths, target_lengths)
        if max_tokens is not None and len(widths) and widths.max() > max_tokens:
            raise ValueError(
                f"max_tokens_per_batch = {max_tokens} is smaller than the longest example ({int(widths.max())} tokens); "
                "raise it or lower max_source_length / max_target_length."
            )
        tie_break = np.random.default_rng(seed).random(len(widths))
        order = np.lexsort((tie_break, target_lengths, source_lengths))
        self.batches = self._cut(order, widths, max_tokens, max_rows)

    @staticmethod
    def _cut(order: np.ndarray, widths: np.ndarray, max_tokens: int | None, max_rows: int | None) -> list[list[int]]:
        batches, current, longest = [], [], 0
        for index in order.tolist():
            width = max(longest, int(widths[index]))
            too_many_tokens = max_tokens is not None and width * (len(current) + 1) > max_tokens
            too_many_rows = max_rows is not None and len(current) >= max_rows
            if current and (too_many_tokens or too_many_rows):
                batches.append(current)
                current, width = [], int(widths[index])
            current.append(index)
            longest = width
        if current:
            batches.append(current)
        return batches

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        if not self.shuffle:
            yield from self.batches
            return
        permutation = np.random.default_rng(self.seed + self.epoch).permutation(len(self.batches))
        for position in permutation.tolist():
            yield self.batches[position]


class PairCollator:
    """Pads a list of :class:`TokenizedPairs` items to the longest row of the batch.

    Returns int64 ``input_ids`` / ``attention_mask`` and ``labels`` padded with -100; the model
    builds ``decoder_input_ids`` from the labels itself (shifted right behind the start token).
    """

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    @staticmethod
    def _pad(rows: list[np.ndarray], value: int) -> tuple[torch.Tensor, np.ndarray]:
        lengths = np.fromiter((len(row) for row in rows), dtype=np.int64, count=len(rows))
        out = np.full((len(rows), int(lengths.max())), value, dtype=np.int64)  # (batch, longest row)
        for row_index, row in enumerate(rows):
            out[row_index, : len(row)] = row
        return torch.from_numpy(out), lengths

    def __call__(self, features: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
        input_ids, lengths = self._pad([f[SOURCE_IDS] for f in features], self.pad_token_id)
        attention_mask = torch.from_numpy((np.arange(input_ids.shape[1])[None, :] < lengths[:, None]).astype(np.int64))
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if TARGET_IDS in features[0]:
            batch["labels"], _ = self._pad([f[TARGET_IDS] for f in features], LABEL_PAD)
        return batch


def padded_fraction(source_lengths: np.ndarray, target_lengths: np.ndarray, batches: list[list[int]]) -> float:
    """Fraction of the source + target positions of ``batches`` that are padding (each side is
    padded to its longest row in the batch)."""
    real = sum(int(source_lengths[b].sum() + target_lengths[b].sum()) for b in batches)
    total = sum(len(b) * int(source_lengths[b].max() + target_lengths[b].max()) for b in batches)
    return 1.0 - real / total if total else 0.0
