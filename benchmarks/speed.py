"""Speed, arithmetic cost and memory of hf_fusion models against HF's BART of identical size.

What a user would otherwise pick is ``BartForConditionalGeneration``; every hf_fusion variant is
timed against it with the *same* batches, in one process, interleaved round by round (the order
reverses every round) so that whatever else runs on the machine slows every model alike; each
figure is the median over rounds. Reported per model:

- **speed vs BART**: training step (forward + backward + AdamW) as ``bart_s / model_s``; greedy
  and beam-4 generation (forced output length) as ``model_tok_s / bart_tok_s``. > 1 = faster.
- **FLOPs vs BART**: ``torch.utils.flop_counter.FlopCounterMode`` over one forward + backward
  (training) and over one ``generate`` call (generation), ``model / bart``. The counter's own
  table has no entry for the CPU attention kernel, so one is added (same formula as its GPU
  entries); element-wise work (softmax, LayerNorm, dropout, the LSTM gates) is not counted by
  the counter for any model.
- **efficiency** = speed vs BART x FLOPs vs BART: 1.0 means the model runs its arithmetic as fast
  as BART runs BART's; a variant below 1 loses time beyond the extra arithmetic it does.
- **peak training memory**: measured in a fresh process per model (see ``memory_probe``).
- **machine load**: ``os.getloadavg`` before, after every round and after the run, and the CPU
  share the benchmark process got (process CPU time / wall time / threads) so that a reader can
  tell a quiet run from a contended one.

Usage: ``python benchmarks/speed.py [--device cuda] [--size bench|paper] [--rounds 5]``; the
results go to ``benchmarks/results/speed_{device}[_{size}].{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import transformers
from transformers import AutoConfig, AutoModelForSeq2SeqLM, BartConfig, BartForConditionalGeneration

import hf_fusion  # noqa: F401  (registers the families)

RESULTS = Path(__file__).resolve().parent / "results"

# Model sizes. "bench": the size the issue's ratios are quoted at; "paper": the papers' base
# Transformer (d_model 512, 6+6 layers, 32k vocabulary); "tiny": the --dry-run smoke size.
SIZES: dict[str, dict] = {
    "bench": {
        "vocab_size": 8000, "d_model": 256, "encoder_layers": 3, "decoder_layers": 3, "encoder_attention_heads": 4,
        "decoder_attention_heads": 4, "encoder_ffn_dim": 1024, "decoder_ffn_dim": 1024, "max_position_embeddings": 512,
        "dropout": 0.1,
    },
    "paper": {
        "vocab_size": 32000, "d_model": 512, "encoder_layers": 6, "decoder_layers": 6, "encoder_attention_heads": 8,
        "decoder_attention_heads": 8, "encoder_ffn_dim": 2048, "decoder_ffn_dim": 2048, "max_position_embeddings": 512,
        "dropout": 0.1,
    },
    "tiny": {
        "vocab_size": 128, "d_model": 32, "encoder_layers": 2, "decoder_layers": 2, "encoder_attention_heads": 2,
        "decoder_attention_heads": 2, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64, "max_position_embeddings": 64, "dropout": 0.1,
    },
}

# name -> (model_type, extra config fields). "bart" is HF's BART; the rest are hf_fusion models.
VARIANTS: dict[str, tuple[str, dict]] = {
    "bart": ("bart", {}),
    "fusion_transformer": ("fusion_transformer", {}),
    "encoder_fusion_transparent": ("encoder_fusion", {"fusion_mode": "transparent"}),
    "encoder_fusion_fine_grained": ("encoder_fusion", {"fusion_mode": "fine_grained"}),
    "encoder_fusion_dlcl": ("encoder_fusion", {"fusion_mode": "dlcl"}),
    "surface_fusion": ("surface_fusion", {}),
    "depthwise_lstm": ("depthwise_lstm", {}),
    "recurrent_stacking": ("recurrent_stacking", {}),
}

# What each generation mode passes to generate (forced length on top).
GENERATION_MODES: dict[str, dict] = {"greedy": {"num_beams": 1}, "beam4": {"num_beams": 4}}


def build(name: str, size: dict, attn_implementation: str | None = None, **overrides) -> torch.nn.Module:
    """A freshly initialised model of ``size`` (same seed for every model). ``overrides`` change
    config fields (the scaling benchmark varies depth and positions through them)."""
    torch.manual_seed(0)
    model_type, extra = VARIANTS[name]
    fields = {**size, **extra, **overrides}
    if attn_implementation is not None:
        fields["attn_implementation"] = attn_implementation
    if model_type == "bart":
        return BartForConditionalGeneration(BartConfig(**fields))
    return AutoModelForSeq2SeqLM.from_config(AutoConfig.for_model(model_type, **fields))


def make_batch(vocab_size: int, batch_size: int, src_len: int, tgt_len: int, device: str) -> dict[str, torch.Tensor]:
    """A fixed random batch: sources padded to between half and all of ``src_len`` (so every
    model pays for its padding mask), full-length labels."""
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(5, vocab_size, (batch_size, src_len), generator=generator)
    labels = torch.randint(5, vocab_size, (batch_size, tgt_len), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    lengths = torch.randint(src_len // 2, src_len + 1, (batch_size,), generator=generator)
    attention_mask[torch.arange(src_len)[None, :] >= lengths[:, None]] = 0
    input_ids = input_ids.masked_fill(attention_mask == 0, 1)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    return {key: value.to(device) for key, value in batch.items()}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict) -> None:
    """One forward + backward + AdamW step."""
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def time_train_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict, device: str, steps: int) -> tuple[float, float, float]:
    """Median wall seconds, median process CPU seconds and best (minimum) wall seconds of one
    training step."""
    model.train()
    wall, cpu = [], []
    for _ in range(steps):
        sync(device)
        start, start_cpu = time.perf_counter(), time.process_time()
        train_step(model, optimizer, batch)
        sync(device)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall), statistics.median(cpu), min(wall)


def generate(model: torch.nn.Module, batch: dict, mode: str, new_tokens: int, **extra) -> torch.Tensor:
    """``generate`` with a forced output length (min = max new tokens), no sampling; ``extra``
    goes to ``generate`` as well (e.g. a static cache and a compiled decoding step)."""
    return model.generate(
        batch["input_ids"],
        attention_mask=batch["attention_mask"],
        do_sample=False,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        **GENERATION_MODES[mode],
        **extra,
    )


@torch.no_grad()
def generation_tokens_per_s(model: torch.nn.Module, batch: dict, mode: str, new_tokens: int, device: str, **extra) -> float:
    """Generated tokens per second: batch x new_tokens / wall time."""
    model.eval()
    sync(device)
    start = time.perf_counter()
    out = generate(model, batch, mode, new_tokens, **extra)
    sync(device)
    elapsed = time.perf_counter() - start
    if out.shape[1] < new_tokens:
        raise RuntimeError(f"generate returned {out.shape[1]} tokens, fewer than the forced {new_tokens}")
    return batch["input_ids"].shape[0] * new_tokens / elapsed


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def flop_counter() -> FlopCounterMode:
    """``FlopCounterMode`` that also counts the CPU flash-attention kernel SDPA dispatches to on CPU
    (the counter's table only has the GPU kernels), so attention is counted on every device. The
    counter looks operators up by overload packet and hands the formulas the argument shapes."""
    custom = {}
    for op_name, count in (
        ("_scaled_dot_product_flash_attention_for_cpu", _cpu_sdpa_flops),
        ("_scaled_dot_product_flash_attention_for_cpu_backward", _cpu_sdpa_backward_flops),
    ):
        if hasattr(torch.ops.aten, op_name):
            custom[getattr(torch.ops.aten, op_name)] = count
    return FlopCounterMode(display=False, custom_mapping=custom)


def count_train_flops(model: torch.nn.Module, batch: dict) -> int:
    """FLOPs of one forward + backward (gradients are discarded afterwards)."""
    model.train()
    with flop_counter() as counter:
        model(**batch).loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


@torch.no_grad()
def count_generation_flops(model: torch.nn.Module, batch: dict, mode: str, new_tokens: int) -> int:
    """FLOPs of one forced-length ``generate`` call."""
    model.eval()
    with flop_counter() as counter:
        generate(model, batch, mode, new_tokens)
    return counter.get_total_flops()


def memory_probe(name: str, size_name: str, batch_args: tuple[int, int, int], attn_implementation: str | None) -> dict:
    """Peak resident memory of training ``name``, measured inside *this* (fresh) process.

    Linux's high-water mark of resident memory (``VmHWM``) can be reset through
    ``/proc/self/clear_refs``. The figure ``train_peak_mb`` is the high-water mark over two
    steady-state training steps minus the resident memory right after the imports: parameters,
    AdamW states, gradients, saved activations and temporaries, i.e. what training this model
    costs on top of the libraries. ``step_peak_mb`` subtracts the resident memory just before
    those steps instead (parameters and optimizer states already there): the activations,
    gradients and temporaries of one step. The parent runs this with a fixed glibc
    ``MALLOC_MMAP_THRESHOLD_`` so that every freed tensor above 128 KiB is returned to the
    system at once and resident memory follows the live tensors.
    """
    base_rss = _proc_status_kb("VmRSS")
    size = SIZES[size_name]
    model = build(name, size, attn_implementation)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = make_batch(size["vocab_size"], *batch_args, "cpu")
    model.train()
    train_step(model, optimizer, batch)  # allocates the optimizer states
    before_steps = _proc_status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    for _ in range(2):
        train_step(model, optimizer, batch)
    peak = _proc_status_kb("VmHWM")
    return {"train_peak_mb": (peak - base_rss) / 1024, "step_peak_mb": (peak - before_steps) / 1024}


def _proc_status_kb(field: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (Linux only)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} field")


def peak_memory_mb(name: str, device: str, size_name: str, batch_args: tuple[int, int, int], attn_implementation: str | None) -> dict:
    """Peak training memory of ``name`` in a fresh process: on CUDA ``max_memory_allocated``
    over three steps; on CPU :func:`memory_probe` run in a child interpreter (one per model, so
    no model sees another's allocator state). Empty when the platform cannot measure it."""
    if device == "cuda":
        model = build(name, SIZES[size_name], attn_implementation).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        torch.cuda.reset_peak_memory_stats()
        time_train_steps(model, optimizer, make_batch(SIZES[size_name]["vocab_size"], *batch_args, device), device, 3)
        peak = torch.cuda.max_memory_allocated() / 2**20
        del model, optimizer
        torch.cuda.empty_cache()
        return {"train_peak_mb": peak}
    if not Path("/proc/self/clear_refs").exists():
        return {}
    command = [
        sys.executable, __file__, "--memory-probe", name, "--size", size_name, "--batch", str(batch_args[0]),
        "--src_len", str(batch_args[1]), "--tgt_len", str(batch_args[2]),
    ] + (["--attn", attn_implementation] if attn_implementation else [])
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    output = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(output.strip().splitlines()[-1])


def load_sample() -> list[float]:
    """1, 5 and 15 minute load averages."""
    return [round(value, 2) for value in os.getloadavg()]


def interleaved(names: list[str], rounds: int, measure: Callable[[str], dict[str, float]], loads: list) -> dict[str, dict[str, float]]:
    """Run ``measure(name)`` for every model, ``rounds`` times, in an order that reverses every
    round; return each quantity's median per model and append a load sample after each round."""
    samples: dict[str, dict[str, list[float]]] = {name: {} for name in names}
    for round_idx in range(rounds):
        for name in names if round_idx % 2 == 0 else list(reversed(names)):
            for key, value in measure(name).items():
                samples[name].setdefault(key, []).append(value)
        loads.append(load_sample())
    return {name: {key: statistics.median(values) for key, values in per.items()} for name, per in samples.items()}


def run(
    names: list[str],
    device: str,
    size_name: str,
    rounds: int,
    batch_args: tuple[int, int, int],
    new_tokens: int,
    steps: int,
    attn_implementation: str | None,
    measure_memory: bool = True,
) -> dict:
    """Measure every model in ``names`` (the first is the reference, BART); returns meta + rows."""
    size = SIZES[size_name]
    meta = {
        "device_name": torch.cuda.get_device_name() if device == "cuda" else f"CPU {platform.processor() or platform.machine()}",
        "size_name": size_name,
        "size": size,
        "batch": batch_args[0],
        "src_len": batch_args[1],
        "tgt_len": batch_args[2],
        "new_tokens": new_tokens,
        "rounds": rounds,
        "steps_per_round": steps,
        "attn_implementation": attn_implementation or "sdpa (default)",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_before": load_sample(),
    }
    models = {name: build(name, size, attn_implementation).to(device) for name in names}
    optimizers = {name: torch.optim.AdamW(model.parameters(), lr=1e-4) for name, model in models.items()}
    batch = make_batch(size["vocab_size"], *batch_args, device)
    gen_batch = {key: value[: max(1, batch_args[0] // 2)] for key, value in batch.items() if key != "labels"}

    results: dict[str, dict] = {}
    for name, model in models.items():  # arithmetic first: it also warms up every code path
        results[name] = {
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
            "train_flops": count_train_flops(model, batch),
            **{f"{mode}_flops": count_generation_flops(model, gen_batch, mode, new_tokens) for mode in GENERATION_MODES},
        }
        time_train_steps(model, optimizers[name], batch, device, 1)

    def measure(name: str) -> dict[str, float]:
        wall, cpu, best = time_train_steps(models[name], optimizers[name], batch, device, steps)
        row = {"train_step_s": wall, "train_cpu_s": cpu, "train_step_best_s": best}
        for mode in GENERATION_MODES:
            row[f"{mode}_tok_s"] = generation_tokens_per_s(models[name], gen_batch, mode, new_tokens, device)
        return row

    loads: list[list[float]] = []
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    timings = interleaved(names, rounds, measure, loads)
    meta["cpu_share"] = (time.process_time() - start_cpu) / (time.perf_counter() - start_wall) / meta["threads"]
    meta["load_per_round"] = loads
    meta["load_after"] = load_sample()

    reference = names[0]
    for name in names:
        results[name].update(timings[name])
        if measure_memory:
            results[name].update(peak_memory_mb(name, device, size_name, batch_args, attn_implementation))
    ref = results[reference]
    for row in results.values():
        row["train_flops_vs_bart"] = row["train_flops"] / ref["train_flops"]
        row["train_speed_vs_bart"] = ref["train_step_s"] / row["train_step_s"]
        row["train_cpu_speed_vs_bart"] = ref["train_cpu_s"] / row["train_cpu_s"]
        row["train_best_speed_vs_bart"] = ref["train_step_best_s"] / row["train_step_best_s"]
        row["train_efficiency"] = row["train_speed_vs_bart"] * row["train_flops_vs_bart"]
        for mode in GENERATION_MODES:
            row[f"{mode}_flops_vs_bart"] = row[f"{mode}_flops"] / ref[f"{mode}_flops"]
            row[f"{mode}_speed_vs_bart"] = row[f"{mode}_tok_s"] / ref[f"{mode}_tok_s"]
            row[f"{mode}_efficiency"] = row[f"{mode}_speed_vs_bart"] * row[f"{mode}_flops_vs_bart"]
        if "train_peak_mb" in row and "train_peak_mb" in ref:
            row["memory_vs_bart"] = row["train_peak_mb"] / ref["train_peak_mb"]
    return {"meta": meta, "results": results}


def to_markdown(report: dict) -> str:
    """The results as a Markdown page: a header stating the setup and the machine load, then the
    table (also what ``benchmarks/readme_table.py`` copies into the README)."""
    meta = report["meta"]
    lines = [
        f"# Speed, arithmetic and memory vs HF BART ({meta['device_name']}, size '{meta['size_name']}')",
        "",
        (f"Size: {json.dumps(meta['size'])}; training batch {meta['batch']} x {meta['src_len']} source / "
        f"{meta['tgt_len']} target tokens, {meta['steps_per_round']} steps per round; generation: half the batch, "
        f"{meta['new_tokens']} forced new tokens; {meta['rounds']} interleaved rounds (medians); attention "
        f"{meta['attn_implementation']}; torch {meta['torch']}, transformers {meta['transformers']}, "
        f"{meta['threads']} threads on {meta['cpu_count']} cores."),
        "",
        (f"Machine load (1/5/15-minute load averages): before {meta['load_before']}, after {meta['load_after']}, "
        f"after each round {meta['load_per_round']}. The benchmark process got {100 * meta['cpu_share']:.0f}% of "
        f"its {meta['threads']} threads' wall time (100% = nothing else competed for its cores)."),
        "",
        speed_table(report),
        "",
        ("Speed ratios > 1 are faster than BART; FLOPs counted by `torch.utils.flop_counter.FlopCounterMode` "
        "(matrix products and attention) over one forward + backward or one `generate` call; efficiency = speed "
        "vs BART x FLOPs vs BART (1.00 = as fast per FLOP as BART). `best run` is the training-step ratio of the "
        "fastest step of each model (other jobs only ever add time, so the minimum is the least disturbed figure); "
        "the JSON also has the ratio by process CPU time. Peak train "
        "memory: resident-memory high-water mark in a fresh process per model over two steady-state training "
        "steps, minus the process's memory after its imports (parameters, AdamW states, gradients, activations)."),
    ]
    return "\n".join(lines) + "\n"


def speed_table(report: dict) -> str:
    """The Markdown table of one results file (rows in the file's order)."""
    header = (
        "| model | params (M) | FLOPs vs BART | train vs BART | train vs BART (best run) | train efficiency | "
        "greedy vs BART | greedy efficiency | beam-4 vs BART | beam-4 efficiency | peak train mem (MB) | mem vs BART |"
    )
    lines = [header, "|---|" + "---:|" * (header.count("|") - 2)]
    for name, r in report["results"].items():
        memory = f"{r['train_peak_mb']:.0f} | {r['memory_vs_bart']:.2f}" if "memory_vs_bart" in r else "n/a | n/a"
        lines.append(
            f"| {name} | {r['params_m']:.2f} | {r['train_flops_vs_bart']:.2f} | {r['train_speed_vs_bart']:.2f} | "
            f"{r['train_best_speed_vs_bart']:.2f} | {r['train_efficiency']:.2f} | {r['greedy_speed_vs_bart']:.2f} | "
            f"{r['greedy_efficiency']:.2f} | {r['beam4_speed_vs_bart']:.2f} | {r['beam4_efficiency']:.2f} | {memory} |"
        )
    return "\n".join(lines)


def write_results(out: Path, stem: str, report: dict, markdown: str) -> None:
    """Write a benchmark's ``STEM.json`` (the measurements) and ``STEM.md`` (its table) into
    ``out`` and print the table: every benchmark script's results file pair."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown)
    print(markdown)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", choices=sorted(SIZES), default="bench")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="training steps per model per round (median)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--src_len", type=int, default=32)
    parser.add_argument("--tgt_len", type=int, default=32)
    parser.add_argument("--new_tokens", type=int, default=24)
    parser.add_argument("--attn", choices=["sdpa", "eager", "flex_attention", "flash_attention_2"], default=None)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    parser.add_argument("--no-memory", action="store_true", help="skip the per-model memory processes")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--memory-probe", metavar="NAME", help=argparse.SUPPRESS)
    args = parser.parse_args()
    batch_args = (args.batch, args.src_len, args.tgt_len)
    if args.memory_probe:
        print(json.dumps(memory_probe(args.memory_probe, args.size, batch_args, args.attn)))
        return
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown:
        parser.error(f"--variants: unknown {unknown}; choose from {sorted(VARIANTS)}")
    names = ["bart"] + [name for name in args.variants if name != "bart"]
    report = run(names, args.device, args.size, args.rounds, batch_args, args.new_tokens, args.steps, args.attn, not args.no_memory)
    stem = f"speed_{args.device}" + ("" if args.size == "bench" else f"_{args.size}")
    write_results(Path(args.out), stem, report, to_markdown(report))


if __name__ == "__main__":
    main()
