"""What the analyses share: a checkpoint, a test sample, the two quality measures, a table file.

The quality of a (modified) model is measured twice, the way the papers report it:

- **loss**: the teacher-forced negative log-likelihood of the references, in nats per target token
  (``</s>`` included, padding excluded), from ``log_softmax`` of the logits the model returns;
  summed over the whole sample before dividing, so batch boundaries do not weight sentences;
- **BLEU / chrF**: sacreBLEU's corpus scores of greedy translations, decoded with the training
  tool's ``translate_lines`` (the same batching as ``hf-fusion translate``) and scored with
  ``hf-fusion evaluate``'s ``corpus_scores``.

Test data is read with the training tool's readers: a parallel file (``.jsonl`` / ``.tsv`` / ...),
a plain source file with a plain reference file, or a split of a built-in corpus.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from training.batching import LABEL_PAD, PairCollator
from training.data import load_parallel_data
from training.evaluate_file import TestSet, corpus_scores, read_test_set
from training.translate import DecodingOptions, max_source_tokens, translate_lines

from ..families import MODEL_FAMILIES

TABLE_SUFFIXES = (".md", ".json")


def load_checkpoint(
    checkpoint: str | os.PathLike, device: str = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """An hf_fusion model (eval mode, float32, on ``device``) and its tokenizer from a saved folder.

    The installed hf_fusion classes are used, not the code saved in the folder
    (``trust_remote_code``): the analyses rebuild models and reach into seam modules, which must be
    this version's.

    Raises:
        ValueError: if the folder holds a model that is not an hf_fusion family.
    """
    model = AutoModelForSeq2SeqLM.from_pretrained(checkpoint)
    if model.config.model_type not in MODEL_FAMILIES:
        raise ValueError(
            f"{checkpoint} holds a {model.config.model_type!r} model; the analyses need an hf_fusion family: "
            f"{', '.join(MODEL_FAMILIES)}."
        )
    return model.to(device).eval(), AutoTokenizer.from_pretrained(checkpoint)


def read_sample(
    test_file: str | os.PathLike | None = None,
    reference_file: str | os.PathLike | None = None,
    corpus: str | None = None,
    split: str = "test",
    max_sentences: int | None = None,
) -> TestSet:
    """The parallel sentences an analysis runs on: ``test_file`` (with ``reference_file`` when it
    is plain text) or the ``split`` of a built-in ``corpus``, the first ``max_sentences`` of them.

    Raises:
        ValueError: neither or both of ``test_file`` and ``corpus``, an unknown split, or a
            ``max_sentences`` below 1.
    """
    if (test_file is None) == (corpus is None):
        raise ValueError("Give exactly one of test_file (with reference_file for plain text) or corpus.")
    if max_sentences is not None and max_sentences < 1:
        raise ValueError(f"max_sentences must be at least 1, got {max_sentences}.")
    if corpus is not None:
        splits = load_parallel_data(dataset_name=corpus, require_train=False)
        if split not in splits:
            raise ValueError(f"split = {split!r} is not a split of {corpus!r}; allowed: {', '.join(splits)}.")
        data = splits[split]
        sample = TestSet(list(data["source"]), list(data["target"]), f"{corpus}-{split}")
    else:
        sample = read_test_set(test_file, reference_file)
    if max_sentences is not None:
        sample = TestSet(sample.sources[:max_sentences], sample.references[:max_sentences], sample.name)
    return sample


def encode_sample(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, sample: TestSet, batch_size: int = 32
) -> list[dict[str, torch.Tensor]]:
    """The sample as padded batches of ``input_ids`` / ``attention_mask`` / ``labels`` (-100 on
    padding), in sample order, tokenized as ``hf-fusion train`` does and cut to what the model
    accepts."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    limit = max_source_tokens(model, tokenizer)
    sources = tokenizer(sample.sources, truncation=True, max_length=limit)["input_ids"]
    targets = tokenizer(text_target=sample.references, truncation=True, max_length=limit)["input_ids"]
    collate = PairCollator(tokenizer.pad_token_id)
    return [
        collate([{"input_ids": source, "labels": target} for source, target in zip(
            sources[start : start + batch_size], targets[start : start + batch_size]
        )])
        for start in range(0, len(sources), batch_size)
    ]


@torch.no_grad()
def token_nll(model: PreTrainedModel, batches: Sequence[Mapping[str, torch.Tensor]]) -> float:
    """Teacher-forced NLL of the labels, nats per target token over all ``batches`` together."""
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for batch in batches:
        batch = {name: tensor.to(device) for name, tensor in batch.items()}
        labels = batch["labels"]
        logits = model(**batch).logits.float()  # (batch, tgt_len, vocab)
        mask = labels != LABEL_PAD
        log_probs = logits.log_softmax(dim=-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
        total -= float(log_probs[mask].sum())
        count += int(mask.sum())
    return total / count


def greedy_scores(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, sample: TestSet, max_length: int | None = None
) -> dict[str, float]:
    """sacreBLEU BLEU and chrF of the model's greedy translations of the sample."""
    hypotheses = translate_lines(model, tokenizer, sample.sources, DecodingOptions(num_beams=1, max_length=max_length))
    return corpus_scores(hypotheses, sample.references)


def quality(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    sample: TestSet,
    batches: Sequence[Mapping[str, torch.Tensor]],
    max_length: int | None = None,
) -> dict[str, float]:
    """``loss`` (teacher-forced NLL per token), ``bleu`` and ``chrf`` (greedy) of the model."""
    return {"loss": token_nll(model, batches), **greedy_scores(model, tokenizer, sample, max_length)}


def _cell(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def check_table_path(output: str | os.PathLike) -> Path:
    """``output`` as a path, refused before any work if it is not a ``.md`` / ``.json`` file.

    Raises:
        ValueError: naming the path and the allowed suffixes.
    """
    output = Path(output)
    if output.suffix not in TABLE_SUFFIXES:
        raise ValueError(f"--output {output} must end in one of {', '.join(TABLE_SUFFIXES)} (a table).")
    return output


def write_table(rows: Sequence[Mapping[str, Any]], output: str | os.PathLike, title: str, notes: str = "") -> Path:
    """Write ``rows`` (one dict per row, the same keys) as a Markdown table (``.md``) or as JSON
    (``.json``: ``{"title", "notes", "rows"}``), creating parent folders.

    Raises:
        ValueError: for another file suffix, or no rows.
    """
    output = check_table_path(output)
    if not rows:
        raise ValueError("There are no rows to write.")
    output.parent.mkdir(parents=True, exist_ok=True)
    if output.suffix == ".json":
        output.write_text(json.dumps({"title": title, "notes": notes, "rows": list(rows)}, indent=2) + "\n")
        return output
    columns = list(rows[0])
    lines = [f"# {title}", ""] + ([notes, ""] if notes else [])
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row[column]) for column in columns) + " |" for row in rows]
    output.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return output


def run_command(main: Callable[[list[str] | None], Any]) -> None:
    """Run an analysis' ``main`` as a command: input it refuses ends the process with the one-line
    message (exit status 1), not a traceback."""
    try:
        main(None)
    except (ValueError, OSError) as error:
        raise SystemExit(f"error: {error}") from None


def add_sample_arguments(parser: argparse.ArgumentParser, scoring: bool = True) -> None:
    """The test-data options every analysis command that runs a model shares, and ``--device``;
    with ``scoring``, also the batch size of the loss and the longest greedy translation."""
    data = parser.add_argument_group("test data (one of --test_file or --corpus)")
    data.add_argument("--test_file", default=None, help="jsonl/json/tsv/csv with source and target, or plain sources")
    data.add_argument("--reference_file", default=None, help="plain-text references, one per line of --test_file")
    data.add_argument("--corpus", default=None, help="a built-in corpus (ding, libreoffice)")
    data.add_argument("--split", default="test", help="split of --corpus (default: test)")
    data.add_argument("--max_sentences", type=int, default=None, help="use only the first N pairs")
    if scoring:
        data.add_argument("--batch_size", type=int, default=32, help="sentences per batch of the teacher-forced loss")
        data.add_argument("--max_length", type=int, default=None, help="longest greedy translation in tokens")
    parser.add_argument("--device", default="cpu", help="where the model runs (cpu, cuda, ...)")


def sample_from_args(args: argparse.Namespace) -> TestSet:
    return read_sample(args.test_file, args.reference_file, args.corpus, args.split, args.max_sentences)
