"""bf16 training throughput of hf_fusion models against HF's BART, and the model FLOP utilisation.

Each model trains for a fixed number of steps in bf16 autocast (the weights and AdamW states stay
float32, as mixed-precision training keeps them) on the same batches; models alternate in
interleaved rounds. Reported per model: target tokens per second, the ratio to BART, and the MFU:
FLOPs of one step counted by ``torch.utils.flop_counter.FlopCounterMode`` (``speed.flop_counter``)
x steps per second / the device's peak bf16 FLOP rate (``--peak-tflops``; the default is the
dense bf16 peak of an H100/H200 SXM, 989 TFLOP/s).

Usage: ``python benchmarks/throughput.py [--size paper] [--out benchmarks/results]`` ->
``throughput_{device}.{json,md}``; ``--size tiny --device cpu`` is the dry run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.speed import RESULTS, SIZES, VARIANTS, build, flop_counter, load_sample, make_batch, sync, write_results

H100_BF16_DENSE_TFLOPS = 989.0


def bf16_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict, device: str) -> None:
    """One mixed-precision training step: bf16 autocast forward/backward, float32 update."""
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def step_flops(model: torch.nn.Module, batch: dict, device: str) -> int:
    """FLOPs of one bf16 forward + backward."""
    with flop_counter() as counter, torch.autocast(device_type=device, dtype=torch.bfloat16):
        loss = model(**batch).loss
    with flop_counter() as backward_counter:
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() + backward_counter.get_total_flops()


def run(names: list[str], device: str, size_name: str, batch_args: tuple[int, int, int], rounds: int, steps: int, peak_tflops: float) -> dict:
    size = SIZES[size_name]
    batch = make_batch(size["vocab_size"], *batch_args, device)
    models = {name: build(name, size).to(device).train() for name in names}
    optimizers = {name: torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda") for name, model in models.items()}
    flops = {name: step_flops(model, batch, device) for name, model in models.items()}
    for name in names:  # warm-up
        bf16_step(models[name], optimizers[name], batch, device)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for round_idx in range(rounds):
        for name in names if round_idx % 2 == 0 else list(reversed(names)):
            sync(device)
            start = time.perf_counter()
            for _ in range(steps):
                bf16_step(models[name], optimizers[name], batch, device)
            sync(device)
            seconds[name].append((time.perf_counter() - start) / steps)
    target_tokens = batch_args[0] * batch_args[2]
    results = {}
    for name in names:
        step_s = statistics.median(seconds[name])
        results[name] = {
            "step_s": step_s,
            "target_tokens_per_s": target_tokens / step_s,
            "step_flops": flops[name],
            "mfu": flops[name] / step_s / (peak_tflops * 1e12),
        }
    for row in results.values():
        row["throughput_vs_bart"] = row["target_tokens_per_s"] / results[names[0]]["target_tokens_per_s"]
        row["flops_vs_bart"] = row["step_flops"] / results[names[0]]["step_flops"]
        row["efficiency"] = row["throughput_vs_bart"] * row["flops_vs_bart"]
    meta = {
        "device_name": torch.cuda.get_device_name() if device == "cuda" else "CPU",
        "size_name": size_name,
        "size": size,
        "batch": batch_args,
        "rounds": rounds,
        "steps_per_round": steps,
        "peak_tflops": peak_tflops,
        "torch": torch.__version__,
        "load": load_sample(),
    }
    return {"meta": meta, "results": results}


def to_markdown(report: dict) -> str:
    meta = report["meta"]
    lines = [
        f"# bf16 training throughput vs HF BART ({meta['device_name']}, size '{meta['size_name']}')",
        "",
        (f"Batch {meta['batch'][0]} x {meta['batch'][1]} source / {meta['batch'][2]} target tokens; bf16 autocast, "
        f"float32 weights and AdamW; {meta['rounds']} interleaved rounds of {meta['steps_per_round']} steps (median); "
        f"MFU against {meta['peak_tflops']:.0f} TFLOP/s; torch {meta['torch']}; load average {meta['load']}."),
        "",
        "| model | target tok/s | vs BART | FLOPs vs BART | efficiency | MFU |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in report["results"].items():
        lines.append(
            f"| {name} | {r['target_tokens_per_s']:.0f} | {r['throughput_vs_bart']:.2f} | {r['flops_vs_bart']:.2f} | "
            f"{r['efficiency']:.2f} | {100 * r['mfu']:.1f}% |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", choices=sorted(SIZES), default="paper")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--src_len", type=int, default=128)
    parser.add_argument("--tgt_len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE_TFLOPS)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    names = ["bart"] + [name for name in args.variants if name != "bart"]
    report = run(names, args.device, args.size, (args.batch, args.src_len, args.tgt_len), args.rounds, args.steps, args.peak_tflops)
    write_results(Path(args.out), f"throughput_{args.device}", report, to_markdown(report))


if __name__ == "__main__":
    main()
