"""Speed and memory of hf_fusion models against HF's own BART of identical size, in one process.

What a user would otherwise pick is ``BartForConditionalGeneration``; every hf_fusion variant is
timed against it (and against the vanilla hf_fusion core of the same size) with the *same*
batches, interleaved round by round so that machine load hits all models alike. Reported:

- training step: forward + backward + AdamW step, median seconds over the rounds;
- generation: greedy and beam-4 tokens/s with a forced output length;
- peak memory of a training step: on CUDA ``max_memory_allocated`` (not reported on CPU).

Ratios are ``bart_time / model_time`` for steps (>1 = faster than BART) and
``model_tokens_per_s / bart_tokens_per_s`` for generation (>1 = faster than BART).

Usage: ``python benchmarks/speed.py [--device cuda] [--rounds 5] [--out benchmarks/results]``
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from transformers import AutoConfig, AutoModelForSeq2SeqLM, BartConfig, BartForConditionalGeneration  # noqa: E402

import hf_fusion  # noqa: E402, F401  (registers the families)

SIZE = dict(
    vocab_size=8000,
    d_model=256,
    encoder_layers=3,
    decoder_layers=3,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=1024,
    decoder_ffn_dim=1024,
    max_position_embeddings=256,
    dropout=0.1,
)

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


def build(name: str) -> torch.nn.Module:
    """A freshly initialised model of the benchmark size (same seed for every model)."""
    torch.manual_seed(0)
    model_type, extra = VARIANTS[name]
    if model_type == "bart":
        return BartForConditionalGeneration(BartConfig(**SIZE))
    return AutoModelForSeq2SeqLM.from_config(AutoConfig.for_model(model_type, **SIZE, **extra))


def make_batch(batch_size: int, src_len: int, tgt_len: int, device: str) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(5, SIZE["vocab_size"], (batch_size, src_len), generator=generator)
    labels = torch.randint(5, SIZE["vocab_size"], (batch_size, tgt_len), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    lengths = torch.randint(src_len // 2, src_len + 1, (batch_size,), generator=generator)
    attention_mask[torch.arange(src_len)[None, :] >= lengths[:, None]] = 0
    input_ids = input_ids.masked_fill(attention_mask == 0, 1)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    return {key: value.to(device) for key, value in batch.items()}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict, device: str, steps: int) -> float:
    """Median seconds of one forward + backward + optimizer step."""
    model.train()
    times = []
    for _ in range(steps):
        sync(device)
        start = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def generation_tokens_per_s(model: torch.nn.Module, batch: dict, num_beams: int, new_tokens: int, device: str) -> float:
    """Generated tokens per second (batch * new_tokens / wall time), output length forced."""
    model.eval()
    sync(device)
    start = time.perf_counter()
    out = model.generate(
        batch["input_ids"],
        attention_mask=batch["attention_mask"],
        num_beams=num_beams,
        do_sample=False,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
    )
    sync(device)
    assert out.shape[1] >= new_tokens
    return batch["input_ids"].shape[0] * new_tokens / (time.perf_counter() - start)


def peak_memory_mb(name: str, device: str, batch_args: tuple[int, int, int]) -> float | None:
    """Peak CUDA memory of training steps of ``name``; ``None`` on CPU, where no per-model figure
    was reliable (process RSS is dominated by the allocator's and the libraries' own footprint)."""
    if device != "cuda":
        return None
    model = build(name).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    torch.cuda.reset_peak_memory_stats()
    time_train_step(model, optimizer, make_batch(*batch_args, device), device, 3)
    return torch.cuda.max_memory_allocated() / 2**20


def run(names: list[str], device: str, rounds: int, batch_args: tuple[int, int, int], new_tokens: int) -> dict:
    models = {name: build(name).to(device) for name in names}
    optimizers = {name: torch.optim.AdamW(model.parameters(), lr=1e-4) for name, model in models.items()}
    batch = make_batch(*batch_args, device)
    gen_batch = {key: value[: max(1, batch_args[0] // 2)] for key, value in batch.items()}
    measures: dict[str, dict[str, list[float]]] = {name: {"train_step_s": [], "greedy_tok_s": [], "beam4_tok_s": []} for name in names}
    for name in names:  # warm-up: allocator, kernels, lazy initialisation
        time_train_step(models[name], optimizers[name], batch, device, 1)
        generation_tokens_per_s(models[name], gen_batch, 1, 4, device)
    for round_idx in range(rounds):
        order = names if round_idx % 2 == 0 else list(reversed(names))
        for name in order:
            measures[name]["train_step_s"].append(time_train_step(models[name], optimizers[name], batch, device, 3))
            measures[name]["greedy_tok_s"].append(generation_tokens_per_s(models[name], gen_batch, 1, new_tokens, device))
            measures[name]["beam4_tok_s"].append(generation_tokens_per_s(models[name], gen_batch, 4, new_tokens, device))
    results = {}
    for name in names:
        medians = {key: statistics.median(values) for key, values in measures[name].items()}
        medians["params_m"] = sum(p.numel() for p in models[name].parameters()) / 1e6
        medians["peak_train_mem_mb"] = peak_memory_mb(name, device, batch_args)
        results[name] = medians
    bart = results["bart"]
    for name, row in results.items():
        row["train_speed_vs_bart"] = bart["train_step_s"] / row["train_step_s"]
        row["greedy_speed_vs_bart"] = row["greedy_tok_s"] / bart["greedy_tok_s"]
        row["beam4_speed_vs_bart"] = row["beam4_tok_s"] / bart["beam4_tok_s"]
        if bart["peak_train_mem_mb"] is not None:
            row["memory_vs_bart"] = row["peak_train_mem_mb"] / bart["peak_train_mem_mb"]
    return results


def to_markdown(results: dict, meta: dict) -> str:
    lines = [
        f"# Speed vs HF BART ({meta['device_name']})",
        "",
        f"Size: {json.dumps(SIZE)}; batch {meta['batch']} (src_len {meta['src_len']}, tgt_len {meta['tgt_len']}); "
        f"generation: half the batch, {meta['new_tokens']} forced new tokens; {meta['rounds']} interleaved rounds; "
        f"torch {meta['torch']}, {meta['threads']} threads. Speed ratios > 1 mean faster than BART.",
        "",
        "| model | params (M) | train step (ms) | train speed vs BART | greedy tok/s | vs BART | beam-4 tok/s | vs BART | peak train mem (MB) | mem vs BART |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['params_m']:.2f} | {1000 * r['train_step_s']:.1f} | {r['train_speed_vs_bart']:.3f} | "
            f"{r['greedy_tok_s']:.0f} | {r['greedy_speed_vs_bart']:.3f} | {r['beam4_tok_s']:.0f} | {r['beam4_speed_vs_bart']:.3f} | "
            + (f"{r['peak_train_mem_mb']:.0f} | {r['memory_vs_bart']:.3f} |" if "memory_vs_bart" in r else "n/a (CPU) | n/a |")
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--src_len", type=int, default=32)
    parser.add_argument("--tgt_len", type=int, default=32)
    parser.add_argument("--new_tokens", type=int, default=24)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args()
    names = ["bart"] + [name for name in args.variants if name != "bart"]
    results = run(names, args.device, args.rounds, (args.batch, args.src_len, args.tgt_len), args.new_tokens)
    meta = {
        "device_name": torch.cuda.get_device_name() if args.device == "cuda" else f"CPU {platform.processor() or platform.machine()}",
        "batch": args.batch,
        "src_len": args.src_len,
        "tgt_len": args.tgt_len,
        "new_tokens": args.new_tokens,
        "rounds": args.rounds,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"speed_{args.device}"
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "size": SIZE, "results": results}, indent=2))
    markdown = to_markdown(results, meta)
    (out / f"{stem}.md").write_text(markdown)
    print(markdown)


if __name__ == "__main__":
    main()
