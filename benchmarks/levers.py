"""What each speed lever of the vanilla core buys, measured A/B on one model in one process, with
HF's BART of the same size timed in the same rounds as the reference a user would otherwise pick.

A lever is a code path (switched by patching one name), a compiled training step
(``torch.compile`` of the model, as ``hf-fusion train --torch_compile true`` does), or a decoding
setting (a static cache and a compiled decoding step: ``generate(cache_implementation="static",
compile_config=...)``). The model runs with the lever off and on, and BART eagerly, interleaved
step by step (the order rotates every round) so that load from other jobs hits all three alike.
Noise on a shared machine only ever *adds* time, so the best (minimum) time of many short runs
is the estimate of each path's own cost; the median is reported beside it. A compiling lever's
first call (the compilation) is kept out of the rounds and reported on its own, with the number
of steps it takes to pay for itself.

Usage: ``python benchmarks/levers.py [--rounds 12] [--levers NAME ...]`` ->
``benchmarks/results/levers_cpu.{json,md}``.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from transformers.generation import CompileConfig

from benchmarks.speed import (
    RESULTS,
    SIZES,
    build,
    generation_tokens_per_s,
    load_sample,
    make_batch,
    train_step,
    write_results,
)
from hf_fusion import heads
from hf_fusion.layers import FusionAttention

MODES = ("greedy", "beam4")


def unfused_projections() -> contextlib.AbstractContextManager:
    """Query/key/value projections as three separate matrix products (the code before the lever)."""
    return mock.patch.object(FusionAttention, "fuse_projections", property(lambda self: False))


def _log_softmax_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0,
                               num_items_in_batch: int | torch.Tensor | None = None) -> torch.Tensor:
    """The head's loss before the lever: a log-softmax, then a gather and a smoothing mean."""
    return heads.log_prob_nll(torch.log_softmax(logits.float(), dim=-1), labels, label_smoothing, num_items_in_batch)


def unfused_cross_entropy() -> contextlib.AbstractContextManager:
    """The LM head's loss as log-softmax + gather + mean instead of torch's fused ``cross_entropy``."""
    return mock.patch.object(heads, "token_cross_entropy", _log_softmax_cross_entropy)


def compiled_decoding() -> dict[str, Any]:
    """``generate`` arguments of the fast decoding path: a preallocated cache and one compiled
    graph per decoding step (transformers compiles on accelerators only unless told otherwise)."""
    config = CompileConfig(fullgraph=True, dynamic=False)
    config._compile_all_devices = True
    return {"cache_implementation": "static", "compile_config": config}


@dataclass(frozen=True)
class Lever:
    """One speed lever: what switches it off and on."""

    description: str
    off: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    on: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    compile_training: bool = False
    generate_kwargs: Callable[[], dict[str, Any]] = field(default=dict)

    @property
    def compiled_measures(self) -> tuple[str, ...]:
        """The measures whose first call compiles with the lever on."""
        training = ("train_step_s",) if self.compile_training else ()
        decoding = tuple(f"{mode}_tok_s" for mode in MODES) if "compile_config" in self.generate_kwargs() else ()
        return training + decoding


LEVERS: dict[str, Lever] = {
    "fused_qkv": Lever(
        "self-attention Q/K/V and cross-attention K/V as one matrix product each (layers.fused_linear): the code fuses them in inference only, so its training rows compare the same path",
        off=unfused_projections,
    ),
    "fused_cross_entropy": Lever(
        "LM-head loss through torch's fused cross_entropy instead of log-softmax + gather + mean (heads.py; in the code)",
        off=unfused_cross_entropy,
    ),
    "compiled_training_step": Lever(
        "torch.compile of the model for the training step (hf-fusion train --torch_compile; off by default)",
        compile_training=True,
    ),
    "compiled_decoding": Lever(
        "static cache + a compiled decoding step in generate (cache_implementation='static', compile_config; opt-in)",
        generate_kwargs=compiled_decoding,
    ),
}


def _time(action: Callable[[], Any]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def measure_lever(name: str, rounds: int, batch_args: tuple[int, int, int], new_tokens: int, size_name: str = "bench") -> dict:
    """Train-step seconds and greedy / beam-4 tokens/s of ``fusion_transformer`` with the lever
    off and on and of BART; returns the minima, medians, the on/off gains and the ratios to BART
    (> 1 = faster), plus the first-call (compilation) cost of a compiling lever."""
    lever = LEVERS[name]
    size = SIZES[size_name]
    model, bart = build("fusion_transformer", size), build("bart", size)
    compiled = torch.compile(model) if lever.compile_training else model
    optimizers = {id(m): torch.optim.AdamW(m.parameters(), lr=1e-4) for m in (model, bart)}
    batch = make_batch(size["vocab_size"], *batch_args, "cpu")
    gen_batch = {key: value[: max(batch_args[0] // 2, 1)] for key, value in batch.items() if key != "labels"}
    paths: dict[str, tuple[torch.nn.Module, torch.nn.Module, Callable, dict]] = {
        "off": (model, model, lever.off, {}),
        "on": (compiled, model, lever.on, lever.generate_kwargs()),
        "bart": (bart, bart, contextlib.nullcontext, {}),
    }

    def once(path: str) -> dict[str, float]:
        train_model, gen_model, context, gen_kwargs = paths[path]
        with context():
            train_model.train()
            row = {"train_step_s": _time(lambda: train_step(train_model, optimizers[id(gen_model)], batch))}
            for mode in MODES:
                row[f"{mode}_tok_s"] = generation_tokens_per_s(gen_model, gen_batch, mode, new_tokens, "cpu", **gen_kwargs)
        return row

    first_calls = {path: once(path) for path in paths}  # warm-up; a compiling lever compiles here
    samples: dict[str, dict[str, list[float]]] = {path: {} for path in paths}
    order = list(paths)
    for round_idx in range(rounds):
        for path in order[round_idx % 3:] + order[: round_idx % 3]:
            for key, value in once(path).items():
                samples[path].setdefault(key, []).append(value)
    result: dict[str, Any] = {"description": lever.description}
    for key in samples["off"]:
        is_time = key == "train_step_s"
        for path in paths:
            result[f"{key}_{path}_best"] = (min if is_time else max)(samples[path][key])
            result[f"{key}_{path}_median"] = statistics.median(samples[path][key])
        for stat in ("best", "median"):
            values = {path: result[f"{key}_{path}_{stat}"] for path in paths}
            speed = {path: 1 / value if is_time else value for path, value in values.items()}
            result[f"{key}_gain_{stat}"] = speed["on"] / speed["off"]
            result[f"{key}_on_vs_bart_{stat}"] = speed["on"] / speed["bart"]
            result[f"{key}_off_vs_bart_{stat}"] = speed["off"] / speed["bart"]
    tokens = gen_batch["input_ids"].shape[0] * new_tokens
    result["first_call"] = {key: _compilation_cost(key, first_calls["on"][key], result, tokens) for key in lever.compiled_measures}
    return result


def _compilation_cost(key: str, first: float, result: dict[str, Any], tokens: int) -> dict[str, Any]:
    """The compilation's seconds (first call minus a typical one) and the calls that pay for it
    (``None``: the compiled path is not faster, it never pays). Generation measures are tokens/s
    (``tokens`` per call), converted to seconds per call."""
    def seconds(value: float) -> float:
        return value if key == "train_step_s" else tokens / value

    typical = {path: seconds(result[f"{key}_{path}_median"]) for path in ("on", "off")}
    overhead = seconds(first) - typical["on"]
    saving = typical["off"] - typical["on"]
    return {"compile_s": round(overhead, 2), "calls_to_pay_off": round(overhead / saving) if saving > 0 else None}


def to_markdown(meta: dict, results: dict[str, dict]) -> str:
    """The levers table: gain with vs without each lever, and both paths against BART."""
    lines = [
        f"# Speed levers of the vanilla core (fusion_transformer, size '{meta['size']}', CPU) against BART",
        "",
        (f"Batch {meta['batch'][0]} x {meta['batch'][1]}/{meta['batch'][2]} tokens, generation half the batch with "
         f"{meta['new_tokens']} forced tokens; {meta['rounds']} rounds (lever off, on and BART interleaved); "
         f"{meta['threads']} threads; load average before {meta['load_before']}, after {meta['load_after']}. "
         "Gain = speed with the lever / speed without (> 1 pays); 'vs BART' = our speed / BART's (eager). "
         "Each cell: best run / median."),
        "",
        "| lever | measure | gain | off vs BART | on vs BART | compilation (s) / calls to pay off |",
        "|---|---|---:|---:|---:|---:|",
    ]
    notes = [f"- **{name}**: {r['description']}" for name, r in results.items()]
    labels = {"train_step_s": "training step", "greedy_tok_s": "greedy", "beam4_tok_s": "beam-4"}
    for name, r in results.items():
        for key, label in labels.items():
            cells = [f"{r[f'{key}_{stat}_best']:.3f} / {r[f'{key}_{stat}_median']:.3f}" for stat in ("gain", "off_vs_bart", "on_vs_bart")]
            first = r.get("first_call", {}).get(key)
            compile_cell = "–" if first is None else f"{first['compile_s']:.1f} / {first['calls_to_pay_off'] or 'never'}"
            lines.append(f"| {name} | {label} | " + " | ".join(cells) + f" | {compile_cell} |")
    return "\n".join([*lines, "", *notes]) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--levers", nargs="*", default=list(LEVERS), choices=list(LEVERS))
    parser.add_argument("--size", choices=sorted(SIZES), default="bench")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--new_tokens", type=int, default=24)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    batch_args = (args.batch, 32, 32) if args.size != "tiny" else (args.batch, 8, 8)
    meta: dict[str, Any] = {"load_before": load_sample(), "threads": torch.get_num_threads(), "rounds": args.rounds,
                            "batch": batch_args, "size": args.size, "new_tokens": args.new_tokens, "torch": torch.__version__}
    results = {name: measure_lever(name, args.rounds, batch_args, args.new_tokens, args.size) for name in args.levers}
    meta["load_after"] = load_sample()
    stem = "levers_cpu" + ("" if args.size == "bench" else f"_{args.size}")
    write_results(Path(args.out), stem, {"meta": meta, "results": results}, to_markdown(meta, results))


if __name__ == "__main__":
    main()
