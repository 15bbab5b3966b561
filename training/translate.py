"""``hf-fusion translate``: sentences in, translations out, with any saved seq2seq model.

    hf-fusion translate MODEL [--input FILE ...] [--output FILE] [--num_beams 5] [--max_tokens 4096]
                              [--length_penalty 1.0] [--max_length N] [--do_sample --top_k --top_p
                              --temperature --seed] [--device cpu] [--dtype float32] [--revision REV]

One sentence per input line (files, or standard input), one translation per output line (a file, or
standard output), in input order: the lines are sorted by length and batched under a token budget
(rows x longest row <= ``--max_tokens``), the way MT toolkits decode (``fairseq-interactive``,
``marian-decoder``), then written back in their original order. An empty line stays an empty line;
a line longer than the model accepts is truncated with a warning that names it; ``| head`` ends the
run quietly.

The model is loaded with ``AutoModelForSeq2SeqLM.from_pretrained(..., trust_remote_code=True)`` and
nothing here imports hf_fusion, so any hf_fusion checkpoint translates where only transformers is
installed (and so does any other seq2seq model with a tokenizer).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import TextIO

import torch
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger("training")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class DecodingOptions:
    """How to decode: the ``generate`` arguments a user sets on the command line.

    Args:
        num_beams: Beam size (1 = greedy, or sampling with ``do_sample``).
        length_penalty: Beam-search length penalty (> 1 favours longer outputs).
        max_length: Longest translation in tokens; ``None`` keeps the model's generation config.
        do_sample: Sample instead of searching.
        top_k / top_p / temperature: Sampling settings (with ``do_sample``).
        max_tokens: Token budget of a batch: rows x longest source row.
    """

    num_beams: int = 5
    length_penalty: float = 1.0
    max_length: int | None = None
    do_sample: bool = False
    top_k: int | None = None
    top_p: float | None = None
    temperature: float | None = None
    max_tokens: int = 4096

    def generate_kwargs(self) -> dict:
        kwargs = {"num_beams": self.num_beams, "do_sample": self.do_sample}
        if self.num_beams > 1:
            kwargs["length_penalty"] = self.length_penalty
        if self.max_length is not None:
            kwargs["max_length"] = self.max_length
        for name in ("top_k", "top_p", "temperature"):
            if getattr(self, name) is not None:
                kwargs[name] = getattr(self, name)
        return kwargs


def load_translator(
    model_id: str, revision: str | None = None, device: str = "cpu", dtype: str = "float32"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Tokenizer and model (in eval mode, on ``device`` in ``dtype``) from a folder or Hub id.

    Raises:
        ValueError: for a ``dtype`` that is not one of :data:`DTYPES`.
        OSError: when the folder or repository holds no model (transformers' message).
    """
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r} is not supported; allowed: {', '.join(DTYPES)}.")
    tokenizer = AutoTokenizer.from_pretrained(model_id, revision=revision, trust_remote_code=True)
    model = AutoModelForSeq2SeqLM.from_pretrained(
        model_id, revision=revision, trust_remote_code=True, dtype=DTYPES[dtype]
    )
    return model.to(device).eval(), tokenizer


def max_source_tokens(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> int:
    """The longest source, in tokens, the model accepts (its position table, else the tokenizer's)."""
    limits = [getattr(model.config, "max_position_embeddings", None), tokenizer.model_max_length]
    return min(limit for limit in limits if isinstance(limit, int) and 0 < limit < 1_000_000_000)


def length_batches(lengths: Sequence[int], max_tokens: int) -> Iterator[list[int]]:
    """Indices of non-empty rows in batches of similar length: rows sorted by length (longest
    first, ties in input order), each batch's rows x longest row within ``max_tokens`` (a row
    longer than the budget goes alone)."""
    order = sorted((index for index, length in enumerate(lengths) if length > 0), key=lambda i: (-lengths[i], i))
    batch: list[int] = []
    for index in order:
        longest = lengths[batch[0]] if batch else lengths[index]
        if batch and (len(batch) + 1) * longest > max_tokens:
            yield batch
            batch = []
        batch.append(index)
    if batch:
        yield batch


def translate_lines(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    lines: Sequence[str],
    options: DecodingOptions,
    progress: bool = False,
) -> list[str]:
    """Translate ``lines`` (one sentence each) and return the translations in input order.

    Empty (or whitespace-only) lines give empty translations without running the model; a line
    longer than the model accepts is truncated to fit, with a warning naming its line number.
    """
    limit = max_source_tokens(model, tokenizer)
    encoded = [tokenizer(line.strip())["input_ids"] if line.strip() else [] for line in lines]
    for number, ids in enumerate(encoded, start=1):
        if len(ids) > limit:
            logger.warning("line %d has %d tokens; the model accepts %d: truncated", number, len(ids), limit)
            encoded[number - 1] = ids[: limit - 1] + ids[-1:]  # keep the end-of-sentence token
    translations = [""] * len(lines)
    batches = list(length_batches([len(ids) for ids in encoded], options.max_tokens))
    bar = _progress_bar(sum(map(len, batches)), enabled=progress)
    device = next(model.parameters()).device
    with torch.no_grad():
        for batch in batches:
            padded = tokenizer.pad({"input_ids": [encoded[i] for i in batch]}, return_tensors="pt").to(device)
            outputs = model.generate(**padded, **options.generate_kwargs())
            for index, text in zip(batch, tokenizer.batch_decode(outputs, skip_special_tokens=True)):
                translations[index] = text.strip()
            bar.update(len(batch))
    bar.close()
    return translations


def _progress_bar(total: int, enabled: bool):
    """A tqdm bar on standard error (standard output carries the translations); silent when off."""
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="line", file=sys.stderr, desc="translating", disable=not enabled)


def read_lines(inputs: Iterable[TextIO]) -> list[str]:
    """Every line of every input, without line endings."""
    return [line.rstrip("\r\n") for handle in inputs for line in handle]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-fusion translate", description="Translate sentences, one per line, with a saved seq2seq model."
    )
    parser.add_argument("model", help="model folder or Hub id (loaded with trust_remote_code)")
    parser.add_argument("--input", nargs="+", default=None, help="input files (default: standard input)")
    parser.add_argument("--output", default=None, help="output file (default: standard output)")
    parser.add_argument("--num_beams", type=int, default=5)
    parser.add_argument("--length_penalty", type=float, default=1.0)
    parser.add_argument("--max_length", type=int, default=None, help="longest translation in tokens")
    parser.add_argument("--max_tokens", type=int, default=4096, help="token budget of a batch (rows x longest row)")
    parser.add_argument("--do_sample", action="store_true", help="sample instead of beam search")
    parser.add_argument("--top_k", type=int, default=None)
    parser.add_argument("--top_p", type=float, default=None)
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0, help="random seed (sampling)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--revision", default=None, help="branch, tag or commit of a Hub model (pin it)")
    return parser


def options_from_args(args: argparse.Namespace) -> DecodingOptions:
    if args.num_beams < 1 or args.max_tokens < 1:
        raise ValueError("--num_beams and --max_tokens must be at least 1.")
    return DecodingOptions(
        num_beams=args.num_beams,
        length_penalty=args.length_penalty,
        max_length=args.max_length,
        do_sample=args.do_sample,
        top_k=args.top_k,
        top_p=args.top_p,
        temperature=args.temperature,
        max_tokens=args.max_tokens,
    )


def main(argv: list[str] | None = None) -> int:
    """``hf-fusion translate``; returns the exit status."""
    args = build_parser().parse_args(argv)
    options = options_from_args(args)
    for path in args.input or []:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--input {path!r} is not a file.")
    torch.manual_seed(args.seed)
    model, tokenizer = load_translator(args.model, args.revision, args.device, args.dtype)
    with ExitStack() as stack:
        inputs = [stack.enter_context(open(path, encoding="utf-8")) for path in args.input] if args.input else [sys.stdin]
        lines = read_lines(inputs)
    translations = translate_lines(model, tokenizer, lines, options, progress=args.input is not None)
    text = "".join(translation + "\n" for translation in translations)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as handle:
            handle.write(text)
        return 0
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (`| head`): nothing is lost that anyone reads; end quietly.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0
