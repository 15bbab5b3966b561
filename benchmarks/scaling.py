"""Training-step time and peak memory against sequence length and depth, on a CPU, as a PNG.

Two sweeps at the benchmark width (``speed.SIZES["bench"]``, d_model 256):

- **sequence length** (source = target length, 32 ... 512) for HF BART and the vanilla core;
- **depth** (layers per stack, 6 ... 48) for recurrent stacking (one shared block per stack),
  the depth-wise LSTM and the vanilla core, at length 32.

Each model's sweep runs in its own fresh process (so no model inherits another's allocator
state); points run in increasing size. Per point: the best of ``--steps`` timed training steps
(forward + backward + AdamW; on a shared machine noise only adds time) and the peak resident
memory while building and training the model, as a rise of Linux's ``VmHWM`` (reset through
``/proc/self/clear_refs`` before each point) over the resident memory before it, with glibc's
``MALLOC_MMAP_THRESHOLD_`` fixed so that freed tensors leave the process at once. The figure
includes parameters, gradients and AdamW states, which is what grows with depth.

Usage: ``python benchmarks/scaling.py`` -> ``benchmarks/results/scaling_cpu.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.speed import RESULTS, SIZES, _proc_status_kb, build, load_sample, make_batch, train_step

SWEEPS: dict[str, dict] = {
    "seq_len": {"models": ["bart", "fusion_transformer"], "points": [32, 64, 128, 256, 512], "label": "source = target length"},
    "depth": {"models": ["fusion_transformer", "recurrent_stacking", "depthwise_lstm"], "points": [6, 12, 24, 48], "label": "layers per stack"},
}


def measure_point(name: str, sweep: str, value: int, batch_size: int, steps: int) -> dict:
    """Best step time and peak memory of one model at one sweep point (in this process)."""
    gc.collect()
    before = _proc_status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    size = SIZES["bench"]
    overrides = {"encoder_layers": value, "decoder_layers": value} if sweep == "depth" else {}
    length = value if sweep == "seq_len" else 32
    model = build(name, size, **overrides).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = make_batch(size["vocab_size"], batch_size, length, length, "cpu")
    train_step(model, optimizer, batch)  # warm-up, allocates the optimizer states
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        train_step(model, optimizer, batch)
        times.append(time.perf_counter() - start)
    peak = _proc_status_kb("VmHWM")
    del model, optimizer, batch
    return {"x": value, "step_s": min(times), "peak_mb": (peak - before) / 1024}


def sweep_in_child(name: str, sweep: str, batch_size: int, steps: int) -> list[dict]:
    """Run one model's sweep in a fresh interpreter; returns its points."""
    command = [sys.executable, __file__, "--child", name, sweep, "--batch", str(batch_size), "--steps", str(steps)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    output = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(output.strip().splitlines()[-1])


def plot(report: dict, path: Path) -> None:
    """Four panels: time and memory against each sweep's axis, log-log."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for column, (sweep, spec) in enumerate(SWEEPS.items()):
        for row, (key, unit) in enumerate((("step_s", "training step (s, best)"), ("peak_mb", "peak train memory (MB)"))):
            ax = axes[row][column]
            for name, points in report["sweeps"][sweep].items():
                ax.plot([p["x"] for p in points], [p[key] for p in points], marker="o", label=name)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(spec["label"])
            ax.set_ylabel(unit)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    meta = report["meta"]
    fig.suptitle(f"CPU, d_model 256, batch {meta['batch']}; load average {meta['load_before']} -> {meta['load_after']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def to_markdown(report: dict) -> str:
    meta = report["meta"]
    lines = [
        "# Training step time and memory vs sequence length and depth (CPU)",
        "",
        (f"d_model 256, batch {meta['batch']}, best of {meta['steps']} steps per point, one fresh process per model "
        f"and sweep; {meta['threads']} threads; load average before {meta['load_before']}, after {meta['load_after']} "
        "(shared machine: absolute times are inflated, the shapes of the curves are the result). Plot: "
        "`scaling_cpu.png`."),
    ]
    for sweep, spec in SWEEPS.items():
        lines += ["", f"## {spec['label']}", "", "| model | " + " | ".join(str(x) for x in spec["points"]) + " |",
                  "|---|" + "---:|" * len(spec["points"])]
        for name, points in report["sweeps"][sweep].items():
            cells = [f"{p['step_s']:.2f} s / {p['peak_mb']:.0f} MB" for p in points]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "SWEEP"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        name, sweep = args.child
        print(json.dumps([measure_point(name, sweep, value, args.batch, args.steps) for value in SWEEPS[sweep]["points"]]))
        return
    meta = {"batch": args.batch, "steps": args.steps, "threads": torch.get_num_threads(), "load_before": load_sample()}
    sweeps = {sweep: {name: sweep_in_child(name, sweep, args.batch, args.steps) for name in spec["models"]} for sweep, spec in SWEEPS.items()}
    meta["load_after"] = load_sample()
    report = {"meta": meta, "sweeps": sweeps}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scaling_cpu.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "scaling_cpu.md").write_text(to_markdown(report))
    plot(report, out / "scaling_cpu.png")
    print(to_markdown(report))


if __name__ == "__main__":
    main()
