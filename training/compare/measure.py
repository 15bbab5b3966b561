"""What a comparison measures beyond ``hf-fusion train``'s BLEU and chrF: test NLL and FLOPs.

- **Test NLL**: mean negative log-likelihood per reference token of the test split, teacher
  forced, without label smoothing (the training loss smooths, so it is not comparable across
  recipes). It is computed from ``log_softmax(logits)``, the distribution beam search decodes
  with: for SurfaceFusion's hard fusion that is the renormalised mixture (docs/surface_fusion.md).
- **FLOPs per optimizer step**: ``torch.utils.flop_counter`` over one forward + backward of a
  training-shaped batch, i.e. the test pairs cut into length-bucketed batches under the run's
  ``max_tokens_per_batch`` (the sampler the trainer uses), the batch of median size. Multiplied by
  the steps it estimates the run's compute, so two variants can be compared at equal FLOPs, not
  only at equal steps. It counts matrix products (what dominates a Transformer), not
  element-wise work.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch


def _test_pairs(folder: Path, corpus: str, settings: dict[str, Any]) -> tuple[Any, Any, Any]:
    """The saved model, its tokenizer and the tokenized test split (the cell's length limits)."""
    import datasets
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from ..batching import TokenizedPairs, tokenize_pairs
    from ..data import load_parallel_data

    model = AutoModelForSeq2SeqLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    test = load_parallel_data(dataset_name=corpus)["test"]
    limit = settings.get("max_test_samples")
    if limit is not None:
        test = test.select(range(min(int(limit), len(test))))
    tokenized = tokenize_pairs(
        datasets.DatasetDict({"test": test}), tokenizer,
        int(settings.get("max_source_length", 128)), int(settings.get("max_target_length", 128)),
    )["test"]
    return model, tokenizer, TokenizedPairs.from_dataset(tokenized)


def _batches(pairs: Any, settings: dict[str, Any]) -> list[list[int]]:
    from ..batching import LengthBucketBatchSampler

    return LengthBucketBatchSampler(
        pairs.source_lengths, pairs.target_lengths, settings.get("max_tokens_per_batch"),
        int(settings.get("per_device_train_batch_size", 8)), 0,
    ).batches


def measure_model(folder: Path, corpus: str, settings: dict[str, Any]) -> dict[str, float | int]:
    """The saved model's test NLL, parameter count and FLOPs per step (one load, one tokenization)."""
    model, tokenizer, pairs = _test_pairs(folder, corpus, settings)
    return {
        "nll": test_nll(model, tokenizer, pairs, settings),
        "parameters": int(model.num_parameters()),
        "flops_per_step": flops_per_step(model, tokenizer, pairs, settings),
    }


def test_nll(model: Any, tokenizer: Any, pairs: Any, settings: dict[str, Any]) -> float:
    """Mean NLL per target token of ``pairs`` (see the module docstring)."""
    from ..batching import LABEL_PAD, PairCollator

    model.eval()
    collate = PairCollator(tokenizer.pad_token_id)
    total, tokens = 0.0, 0
    with torch.inference_mode():
        for batch_indices in _batches(pairs, settings):
            batch = collate([pairs[index] for index in batch_indices])
            logits = model(**batch).logits.float()  # (batch, tgt_len, vocab)
            log_probs = logits.log_softmax(dim=-1)
            labels = batch["labels"]
            mask = labels != LABEL_PAD
            picked = log_probs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            total -= float(picked[mask].sum())
            tokens += int(mask.sum())
    return total / max(tokens, 1)


def flops_per_step(model: Any, tokenizer: Any, pairs: Any, settings: dict[str, Any]) -> int:
    """FLOPs of one forward + backward on the median training-shaped batch (see the module docstring)."""
    from torch.utils.flop_counter import FlopCounterMode

    from ..batching import PairCollator

    model.train()
    batches = _batches(pairs, settings)
    sizes = [len(batch) * int(max(pairs.source_lengths[batch].max(), pairs.target_lengths[batch].max())) for batch in batches]
    median = batches[int(np.argsort(sizes)[len(sizes) // 2])]
    batch = PairCollator(tokenizer.pad_token_id)([pairs[index] for index in median])
    counter = FlopCounterMode(display=False)
    with counter:
        model(**batch).loss.backward()
    return int(counter.get_total_flops())
