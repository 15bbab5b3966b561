"""Decoding speed of several checkpoints on the same inputs (Dabre & Fujita's journal version,
"Recurrent Stacking of Layers in Neural Networks: An Application to Neural Machine Translation",
arXiv 2106.10002).

The paper's claim: transfer learning (initialising the recurrently stacked model from a trained
vanilla model, ``hf_fusion/transfer.py``) "helps in faster decoding on top of the already reduced
number of parameters". A recurrently stacked model initialised by transfer has exactly the
architecture of one trained from scratch, so at a fixed depth its cost per decoding step is the
same; what can differ is the *number* of steps: the length of the translations it produces, and in
beam search how soon every beam has finished. A second route to faster decoding is a model that
keeps its quality with fewer recurrences (decode it with ``encoder_layers`` / ``decoder_layers``
lowered, see :mod:`hf_fusion.analysis.recurrence`). Which of the two the paper's speed-up comes
from is not pinned down here (unconfirmed); this module measures both ingredients, so the question
can be answered on one's own models:

- **sentences/s** and **seconds per sentence**: wall-clock decoding time of the whole input with
  ``generate`` (same batch size, beam size, maximum length, device and threads for every model);
- **generated tokens/s** and **mean output length**: tokens generated per sentence (``</s>``
  included, the start token and padding not), which separates "fewer steps" from "cheaper steps".

Timing protocol: one untimed warm-up batch per model, then ``rounds`` rounds; each round decodes
the whole input with every model, the models in a rotated order (round r starts with model r mod
K), so a slow period of the machine hits every model alike; a model's time is its median over the
rounds, and ``spread`` = (max - min) / median shows how stable it was. Decoding is deterministic, so
the outputs (and token counts) are the same every round.

Command line::

    python -m hf_fusion.analysis.decoding_speed SCRATCH_RS TRANSFER_RS --corpus ding --max_sentences 200 \
        --num_beams 4 --output speed.md
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .common import add_sample_arguments, check_table_path, load_checkpoint, run_command, sample_from_args, write_table
from .recurrence import with_depth


class Decoder(NamedTuple):
    """A model to time: its name in the table, the model and its tokenizer."""

    name: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase


@torch.no_grad()
def _decode(decoder: Decoder, batches: Sequence[dict[str, torch.Tensor]], generate_kwargs: dict) -> int:
    """Decode every batch; return the number of generated tokens (``</s>`` included, start
    token and padding excluded)."""
    pad = decoder.model.generation_config.pad_token_id
    pad = decoder.tokenizer.pad_token_id if pad is None else pad
    tokens = 0
    for batch in batches:
        output = decoder.model.generate(**batch, **generate_kwargs)
        tokens += int((output[:, 1:] != pad).sum())  # int() waits for the device: the GPU work is timed too
    return tokens


def compare_decoding_speed(
    decoders: Sequence[Decoder],
    sources: Sequence[str],
    batch_size: int = 32,
    num_beams: int = 4,
    max_length: int = 128,
    rounds: int = 3,
) -> list[dict[str, Any]]:
    """Time every model decoding ``sources`` in interleaved rounds (see the module docstring).

    Args:
        decoders: The models to compare (at least one), each with its own tokenizer.
        sources: The sentences every model translates, in batches of ``batch_size`` in this order.
        batch_size / num_beams / max_length: The decoding settings, the same for every model
            (``max_length`` counts the start token, as ``generate`` does).
        rounds: Timed rounds (at least 1).

    Returns:
        One row per model: ``model``, ``parameters``, ``sentences``, ``seconds`` (median),
        ``sentences_per_s``, ``ms_per_sentence``, ``tokens_per_s``, ``mean_output_length``,
        ``spread``.
    """
    if not decoders:
        raise ValueError("Give at least one model to time.")
    for name, value in (("batch_size", batch_size), ("num_beams", num_beams), ("rounds", rounds),
                        ("max_length", max_length)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}.")
    if not sources:
        raise ValueError("There are no sentences to decode.")
    generate_kwargs = {"num_beams": num_beams, "max_length": max_length, "do_sample": False}
    batches = []
    for decoder in decoders:
        decoder.model.eval()
        device = next(decoder.model.parameters()).device
        batches.append([
            decoder.tokenizer(list(sources[start : start + batch_size]), return_tensors="pt", padding=True).to(device)
            for start in range(0, len(sources), batch_size)
        ])
    for decoder, model_batches in zip(decoders, batches):
        _decode(decoder, model_batches[:1], generate_kwargs)  # warm-up, untimed
    tokens = [0] * len(decoders)
    times: list[list[float]] = [[] for _ in decoders]
    for round_idx in range(rounds):
        for offset in range(len(decoders)):
            index = (round_idx + offset) % len(decoders)
            start = time.perf_counter()
            tokens[index] = _decode(decoders[index], batches[index], generate_kwargs)
            times[index].append(time.perf_counter() - start)
    rows = []
    for decoder, seconds_per_round, generated in zip(decoders, times, tokens):
        seconds = statistics.median(seconds_per_round)
        rows.append({
            "model": decoder.name,
            "parameters": sum(parameter.numel() for parameter in decoder.model.parameters()),
            "sentences": len(sources),
            "seconds": seconds,
            "sentences_per_s": len(sources) / seconds,
            "ms_per_sentence": 1000.0 * seconds / len(sources),
            "tokens_per_s": generated / seconds,
            "mean_output_length": generated / len(sources),
            "spread": (max(seconds_per_round) - min(seconds_per_round)) / seconds,
        })
    return rows


def main(argv: list[str] | None = None) -> Path:
    """``python -m hf_fusion.analysis.decoding_speed CHECKPOINT [CHECKPOINT ...] (--test_file F | --corpus C)
    --output T``."""
    parser = argparse.ArgumentParser(description="Compare the decoding speed and output length of checkpoints on "
                                     "the same inputs (interleaved timed rounds).")
    parser.add_argument("checkpoints", nargs="+", help="saved model folders")
    parser.add_argument("--num_beams", type=int, default=4)
    parser.add_argument("--decode_batch_size", type=int, default=32, help="sentences per generate call")
    parser.add_argument("--max_output_length", type=int, default=128, help="generate's max_length")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--depth", type=int, default=None,
                        help="decode every (recurrently stacked) model with this many recurrences per stack")
    parser.add_argument("--output", required=True, help="table to write (.md or .json)")
    add_sample_arguments(parser, scoring=False)
    args = parser.parse_args(argv)
    check_table_path(args.output)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    decoders = []
    for checkpoint in args.checkpoints:
        model, tokenizer = load_checkpoint(checkpoint, args.device)
        if args.depth is not None:
            model = with_depth(model, args.depth, args.depth)
        decoders.append(Decoder(checkpoint, model, tokenizer))
    sample = sample_from_args(args)
    rows = compare_decoding_speed(decoders, sample.sources, args.decode_batch_size, args.num_beams,
                                  args.max_output_length, args.rounds)
    notes = (f"{len(sample.sources)} sentences of {sample.name}; batch {args.decode_batch_size}, beam {args.num_beams}, "
             f"max_length {args.max_output_length}, {args.rounds} interleaved rounds (median), "
             f"{torch.get_num_threads()} CPU threads" + ("" if args.depth is None else f", depth {args.depth}") + ".")
    path = write_table(rows, args.output, "Decoding speed", notes)
    print(f"Wrote {path}")
    return path


if __name__ == "__main__":
    run_command(main)
