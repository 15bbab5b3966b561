"""Batching: length-bucketed batches under a token budget, padding to the batch, resumable order."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import DataCollatorForSeq2Seq

from tests.cli_helpers import random_pairs
from training.batching import LengthBucketBatchSampler, PairCollator, padded_fraction


def test_length_bucket_batches_cover_every_example_under_the_budget() -> None:
    rng = np.random.default_rng(1)
    source_lengths = rng.integers(2, 40, 500)
    # Translations are about as long as their sources.
    lengths = [(int(n), max(2, int(n + rng.integers(-3, 4)))) for n in source_lengths]
    pairs = random_pairs(lengths)
    sampler = LengthBucketBatchSampler(pairs.source_lengths, pairs.target_lengths, max_tokens=400, max_rows=32, seed=3)
    epochs = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        epochs.append(batches)
        assert sorted(i for batch in batches for i in batch) == list(range(500))  # each example once
        for batch in batches:
            width = max(max(lengths[i]) for i in batch)
            assert len(batch) <= 32 and len(batch) * width <= 400
    assert epochs[0] != epochs[1] and sorted(map(tuple, epochs[0])) == sorted(map(tuple, epochs[1]))
    sampler.set_epoch(0)
    assert list(sampler) == epochs[0]  # an epoch's order is a function of (seed, epoch): resumable
    shuffled = np.random.default_rng(0).permutation(500)
    random_batches = [shuffled[i : i + 32].tolist() for i in range(0, 500, 32)]
    bucketed = padded_fraction(pairs.source_lengths, pairs.target_lengths, sampler.batches)
    assert bucketed < 0.5 * padded_fraction(pairs.source_lengths, pairs.target_lengths, random_batches)
    with pytest.raises(ValueError, match="smaller than the longest example"):
        LengthBucketBatchSampler(pairs.source_lengths, pairs.target_lengths, max_tokens=20, max_rows=None)


def test_pair_collator_matches_datacollator_for_seq2seq() -> None:
    pairs = random_pairs([(5, 3), (9, 7), (2, 11)])
    features = [pairs[i] for i in range(len(pairs))]
    ours = PairCollator(pad_token_id=1)(features)

    class PadOnly:  # the tokenizer interface DataCollatorForSeq2Seq pads through
        padding_side = "right"
        pad_token_id = 1
        model_input_names = ["input_ids", "attention_mask"]

        def pad(self, features, return_tensors=None, **kwargs):
            width = max(len(f["input_ids"]) for f in features)
            ids = [list(f["input_ids"]) + [1] * (width - len(f["input_ids"])) for f in features]
            mask = [[1] * len(f["input_ids"]) + [0] * (width - len(f["input_ids"])) for f in features]
            return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}

    reference = DataCollatorForSeq2Seq(PadOnly(), model=None)(
        [{"input_ids": f["input_ids"].tolist(), "labels": f["labels"].tolist()} for f in features]
    )
    for key in ("input_ids", "attention_mask", "labels"):
        torch.testing.assert_close(ours[key], reference[key].to(torch.int64), msg=key)
