"""What each speed lever of the vanilla core buys, measured A/B on one model in one process.

Each lever is a code path that can be switched off (or, for a change proposed in a file this
benchmark does not own, switched on) by patching one name. The same model and batch run with the
lever off and on, interleaved step by step (order reversed every round) so that load from other
jobs hits both alike. On a shared machine noise only ever *adds* time, so the best (minimum) time
of many short runs is the estimate of each path's own cost; the median is reported beside it.

Usage: ``python benchmarks/levers.py [--rounds 12]`` -> ``benchmarks/results/levers_cpu.{json,md}``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.speed import RESULTS, SIZES, build, generation_tokens_per_s, load_sample, make_batch, train_step
from hf_fusion import heads
from hf_fusion.layers import FusionAttention


@contextlib.contextmanager
def unfused_projections() -> Iterator[None]:
    """Query/key/value projections as three separate matrix products (the code before the lever)."""
    with mock.patch.object(FusionAttention, "fuse_projections", property(lambda self: False)):
        yield


def _cross_entropy(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0, num_items_in_batch=None) -> torch.Tensor:
    """torch's fused cross-entropy with the head's normalisation (sum / target tokens)."""
    total = torch.nn.functional.cross_entropy(
        logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, label_smoothing=label_smoothing, reduction="sum"
    )
    denominator = (labels != -100).sum() if num_items_in_batch is None else num_items_in_batch
    return total / denominator


@contextlib.contextmanager
def fused_cross_entropy() -> Iterator[None]:
    """The LM head's loss as ``torch.nn.functional.cross_entropy`` (what BART uses) instead of
    log-softmax + gather + a smoothing mean; a change to ``hf_fusion/heads.py``."""
    with mock.patch.object(heads, "token_cross_entropy", _cross_entropy):
        yield


# name -> (description, context manager giving the "off" path, context manager giving the "on" path)
LEVERS: dict[str, tuple[str, Callable, Callable]] = {
    "fused_qkv": (
        "self-attention Q/K/V and cross-attention K/V as one matrix product each (layers.fused_linear); in the code",
        unfused_projections,
        contextlib.nullcontext,
    ),
    "fused_cross_entropy": (
        "LM-head loss through torch's cross_entropy; proposed for heads.py (not in the code)",
        contextlib.nullcontext,
        fused_cross_entropy,
    ),
}


def measure_lever(name: str, rounds: int, batch_args: tuple[int, int, int], new_tokens: int) -> dict:
    """Train-step seconds and greedy / beam-4 tokens/s of ``fusion_transformer`` with the lever off
    and on; returns the minima, medians and the on/off speed ratios (> 1 = the lever pays)."""
    size = SIZES["bench"]
    model = build("fusion_transformer", size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = make_batch(size["vocab_size"], *batch_args, "cpu")
    gen_batch = {key: value[: batch_args[0] // 2] for key, value in batch.items() if key != "labels"}
    _, off, on = LEVERS[name]
    samples: dict[str, dict[str, list[float]]] = {"off": {}, "on": {}}

    def once(state: str) -> None:
        with (off if state == "off" else on)():
            model.train()
            start = time.perf_counter()
            train_step(model, optimizer, batch)
            row = {"train_step_s": time.perf_counter() - start}
            for mode in ("greedy", "beam4"):
                row[f"{mode}_tok_s"] = generation_tokens_per_s(model, gen_batch, mode, new_tokens, "cpu")
        for key, value in row.items():
            samples[state].setdefault(key, []).append(value)

    once("off"), once("on")  # warm-up
    samples = {"off": {}, "on": {}}
    for round_idx in range(rounds):
        for state in ("off", "on") if round_idx % 2 == 0 else ("on", "off"):
            once(state)
    result = {"description": LEVERS[name][0]}
    for key in samples["off"]:
        best = min if key.endswith("_s") and not key.endswith("tok_s") else max
        for state in ("off", "on"):
            result[f"{key}_{state}_best"] = best(samples[state][key])
            result[f"{key}_{state}_median"] = statistics.median(samples[state][key])
        for stat in ("best", "median"):
            ratio = result[f"{key}_on_{stat}"] / result[f"{key}_off_{stat}"]
            result[f"{key}_gain_{stat}"] = 1 / ratio if key == "train_step_s" else ratio
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--levers", nargs="*", default=list(LEVERS), choices=list(LEVERS))
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    batch_args, new_tokens = (32, 32, 32), 24
    meta = {"load_before": load_sample(), "threads": torch.get_num_threads(), "rounds": args.rounds, "batch": batch_args}
    results = {name: measure_lever(name, args.rounds, batch_args, new_tokens) for name in args.levers}
    meta["load_after"] = load_sample()
    lines = [
        "# Speed levers of the vanilla core (fusion_transformer, bench size, CPU)",
        "",
        (f"Batch {batch_args[0]} x {batch_args[1]}/{batch_args[2]} tokens, generation half the batch with {new_tokens} "
        f"forced tokens; {args.rounds} interleaved rounds per lever; {meta['threads']} threads; load average before "
        f"{meta['load_before']}, after {meta['load_after']}. Gain = speed with the lever / speed without (> 1 pays), "
        "from the best run of each path (noise on a shared machine only adds time) and from the medians."),
        "",
        "| lever | train gain (best / median) | greedy gain (best / median) | beam-4 gain (best / median) |",
        "|---|---:|---:|---:|",
    ]
    for name, r in results.items():
        cells = [f"{r[f'{key}_gain_best']:.3f} / {r[f'{key}_gain_median']:.3f}" for key in ("train_step_s", "greedy_tok_s", "beam4_tok_s")]
        lines.append(f"| {name}: {r['description']} | " + " | ".join(cells) + " |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "levers_cpu.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    (out / "levers_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
