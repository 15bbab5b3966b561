"""Does a deep depth-wise LSTM Transformer converge where a deep post-norm residual one struggles?

Xu et al. (arXiv 2007.06257) report that depth-wise LSTMs let deep (e.g. 24-layer) Transformers
converge. This script checks the claim at toy scale on a CPU: two seq2seq models of the same depth
(24 encoder + 24 decoder layers by default) and width, one with residual post-norm connections
(BART/Transformer-base style: ``normalize_before=False``) and one with the depth-wise LSTM
(``DepthwiseLSTMConfig`` defaults), trained on the project's built-in Ding En->De corpus with the
same tokenizer, batches (same order), optimiser and schedule, for the same number of steps.

A shallow residual post-norm model (``--control-layers``, 6+6 by default) is trained alongside as
a control: it shows what a healthy model reaches in the same number of steps. The models are
trained in lockstep (one step of each in turn), so a wall-clock cap stops all of them at the same
step and all see the same machine load. Recorded per model: the training loss every
``--log-every`` steps, the validation loss every ``--eval-every`` steps, the gradient norm of the
bottom encoder layer and of the top decoder layer (the paper's argument is about how well shallow
layers receive gradient), and wall time. "Converged" is a stated, checkable criterion: the final
validation loss is at least 10% below the cross-entropy of a unigram model of the training
targets -- a deep model that fails to train plateaus near that unigram loss.

Outputs (``--out-dir``): ``deep_convergence.json`` (everything), ``deep_convergence.md`` (summary
table) and ``deep_convergence.png`` (curves).

Run (1 thread; about 20 minutes on a shared 2-core machine)::

    PYTHONPATH=. python benchmarks/deep_convergence.py > benchmarks/results/deep_convergence.log 2>&1 &
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import time
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from hf_fusion import (
    DepthwiseLSTMConfig,
    DepthwiseLSTMForConditionalGeneration,
    FusionTransformerConfig,
    FusionTransformerForConditionalGeneration,
)
from training.corpora import build_default_corpus
from training.tokenizer import train_tokenizer

# Depth-wise LSTM models by how they differ from the family's defaults (the authors' cell).
DLSTM_VARIANTS: dict[str, dict[str, object]] = {
    "depthwise_lstm": {},
    "depthwise_lstm_ffn": {"dlstm_candidate": "ffn"},
    # one option of the authors' cell changed at a time
    "depthwise_lstm_relu": {"dlstm_activation": "relu"},
    "depthwise_lstm_pure": {"dlstm_attention_residual": False},
    "depthwise_lstm_per_sublayer": {"dlstm_decoder_mode": "per_sublayer"},
    "depthwise_lstm_per_gate": {"dlstm_gate_norm": "per_gate"},
    # the family's defaults before they became the authors' cell
    "depthwise_lstm_pure_relu": {
        "dlstm_attention_residual": False,
        "dlstm_decoder_mode": "per_sublayer",
        "dlstm_gate_norm": "per_gate",
        "dlstm_activation": "relu",
    },
}
# The deep models this script can train (the shallow control is added with --control-layers).
VARIANTS = ("residual_postnorm", *DLSTM_VARIANTS)
# One colour per model in every plot, so the figures of several runs read alike.
COLORS = {
    "residual_postnorm": "tab:blue", "depthwise_lstm": "tab:orange", "depthwise_lstm_ffn": "tab:purple",
    "depthwise_lstm_pure_relu": "tab:green",
}
# Run settings that must agree before results of two runs are shown side by side.
COMPARABLE = (
    "layers", "d_model", "heads", "ffn_dim", "vocab_size", "max_len", "batch_size", "lr", "warmup", "dropout", "seed",
)

def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=24, help="encoder layers = decoder layers")
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--ffn-dim", type=int, default=256, help="residual model's FFN width (4 d_model)")
    parser.add_argument("--vocab-size", type=int, default=2000)
    parser.add_argument("--max-len", type=int, default=32, help="drop pairs longer than this (tokens)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    parser.add_argument("--warmup", type=int, default=100, help="linear warmup steps, then inverse sqrt")
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--eval-size", type=int, default=256, help="validation pairs per evaluation")
    parser.add_argument(
        "--control-layers", type=int, default=6,
        help="also train a shallow residual post-norm control of this depth (0: none): what a healthy model reaches",
    )
    parser.add_argument("--max-minutes", type=float, default=18.0, help="wall-clock cap for training all models")
    parser.add_argument(
        "--variants", type=lambda text: text.split(","), default=["residual_postnorm", "depthwise_lstm"],
        help=f"comma-separated deep models to train, from {', '.join(VARIANTS)}",
    )
    parser.add_argument("--tag", default="deep_convergence", help="stem of the output file names")
    parser.add_argument(
        "--merge", type=Path, nargs="*", default=[],
        help="result JSONs of earlier runs with the same data, model size, schedule and steps: "
        "their models are added to this run's table and plot",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown:
        parser.error(f"--variants: unknown {unknown}; allowed: {', '.join(VARIANTS)}")
    return args


def encode_corpus(args: argparse.Namespace):
    """Corpus -> tokenizer -> lists of (source ids, target ids) for train and validation."""
    corpus = build_default_corpus("ding")
    train = corpus["train"]
    tokenizer = train_tokenizer(list(train["source"]) + list(train["target"]), vocab_size=args.vocab_size)

    def encode(split) -> list[tuple[list[int], list[int]]]:
        sources = tokenizer(list(split["source"]))["input_ids"]
        targets = tokenizer(list(split["target"]))["input_ids"]
        return [(s, t) for s, t in zip(sources, targets) if len(s) <= args.max_len and len(t) <= args.max_len]

    return tokenizer, encode(train), encode(corpus["validation"])[: args.eval_size]


def collate(pairs: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: input_ids/attention_mask (batch, src_len), labels (batch, tgt_len) with -100."""
    src_len = max(len(s) for s, _ in pairs)
    tgt_len = max(len(t) for _, t in pairs)
    input_ids = torch.full((len(pairs), src_len), pad_id)
    labels = torch.full((len(pairs), tgt_len), -100)
    for row, (source, target) in enumerate(pairs):
        input_ids[row, : len(source)] = torch.tensor(source)
        labels[row, : len(target)] = torch.tensor(target)
    return {"input_ids": input_ids, "attention_mask": (input_ids != pad_id).long(), "labels": labels}


def unigram_cross_entropy(train: list, validation: list, vocab_size: int) -> float:
    """Per-token CE (nats) of add-one-smoothed target token frequencies on the validation targets."""
    counts = Counter(token for _, target in train for token in target)
    total = sum(counts.values()) + vocab_size
    tokens = [token for _, target in validation for token in target]
    return -sum(math.log((counts[token] + 1) / total) for token in tokens) / len(tokens)


def build_models(args: argparse.Namespace, vocab_size: int) -> dict[str, nn.Module]:
    common = dict(
        vocab_size=vocab_size,
        d_model=args.d_model,
        encoder_layers=args.layers,
        decoder_layers=args.layers,
        encoder_attention_heads=args.heads,
        decoder_attention_heads=args.heads,
        encoder_ffn_dim=args.ffn_dim,
        decoder_ffn_dim=args.ffn_dim,
        max_position_embeddings=args.max_len,
        dropout=args.dropout,
    )
    models = {}
    for name in args.variants:
        torch.manual_seed(args.seed)
        if name == "residual_postnorm":
            models[name] = FusionTransformerForConditionalGeneration(FusionTransformerConfig(**common, normalize_before=False))
        else:
            models[name] = DepthwiseLSTMForConditionalGeneration(DepthwiseLSTMConfig(**common, **DLSTM_VARIANTS[name]))
    if args.control_layers:
        torch.manual_seed(args.seed)
        shallow = dict(common, encoder_layers=args.control_layers, decoder_layers=args.control_layers)
        models[f"control_residual_postnorm_{args.control_layers}L"] = FusionTransformerForConditionalGeneration(
            FusionTransformerConfig(**shallow, normalize_before=False)
        )
    return models


def layer_grad_norm(layer: nn.Module) -> float:
    return math.sqrt(sum(float(p.grad.pow(2).sum()) for p in layer.parameters() if p.grad is not None))


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> float:
    """Token-level validation CE (nats), dropout off."""
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        tokens = int((batch["labels"] != -100).sum())
        total += float(model(**batch).loss) * tokens
        count += tokens
    model.train()
    return total / count


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    random.seed(args.seed)
    start = time.time()
    tokenizer, train, validation = encode_corpus(args)
    vocab_size, pad_id = len(tokenizer), tokenizer.pad_token_id
    unigram = unigram_cross_entropy(train, validation, vocab_size)
    print(f"data: {len(train)} train / {len(validation)} eval pairs, vocab {vocab_size}, unigram CE {unigram:.3f}")

    order = list(range(len(train)))
    random.Random(args.seed).shuffle(order)
    eval_batches = [collate(validation[i : i + 64], pad_id) for i in range(0, len(validation), 64)]

    models = build_models(args, vocab_size)
    optimizers, schedulers = {}, {}
    for name, model in models.items():
        model.train()
        optimizers[name] = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.9, 0.98), eps=1e-9)
        schedulers[name] = torch.optim.lr_scheduler.LambdaLR(
            optimizers[name], lambda step: min((step + 1) / args.warmup, math.sqrt(args.warmup / (step + 1)))
        )
    results = {
        name: {
            "parameters": model.num_parameters(),
            "train": [],
            "validation": [],
            "seconds": 0.0,
            "diverged": False,
        }
        for name, model in models.items()
    }
    running = {name: [] for name in models}
    print({name: r["parameters"] for name, r in results.items()}, flush=True)

    train_start = time.time()
    steps_done = 0
    for step in range(1, args.steps + 1):
        if (time.time() - train_start) / 60 > args.max_minutes:
            print(f"wall-clock cap reached after {steps_done} steps", flush=True)
            break
        first = ((step - 1) * args.batch_size) % len(order)
        batch = collate([train[i] for i in order[first : first + args.batch_size]], pad_id)
        for name, model in models.items():
            if results[name]["diverged"]:
                continue
            tic = time.time()
            loss = model(**batch).loss
            loss.backward()
            loss = loss.item()
            bottom = layer_grad_norm(model.model.encoder.layers[0])
            top = layer_grad_norm(model.model.decoder.layers[-1])
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
            schedulers[name].step()
            results[name]["seconds"] += time.time() - tic
            if not math.isfinite(loss):
                results[name]["diverged"] = True
                print(f"{name}: loss became {loss} at step {step}", flush=True)
                continue
            running[name].append((loss, bottom, top))
            if step % args.log_every == 0:
                losses, bottoms, tops = zip(*running[name])
                entry = {
                    "step": step,
                    "loss": sum(losses) / len(losses),
                    "grad_norm_encoder_layer0": sum(bottoms) / len(bottoms),
                    "grad_norm_decoder_top_layer": sum(tops) / len(tops),
                }
                results[name]["train"].append(entry)
                running[name] = []
            if step % args.eval_every == 0 or step == args.steps:
                results[name]["validation"].append({"step": step, "loss": evaluate(model, eval_batches)})
        steps_done = step
        if step % args.log_every == 0:
            print(
                f"step {step}: "
                + ", ".join(f"{n} {r['train'][-1]['loss']:.3f}" for n, r in results.items() if r["train"])
                + f" ({time.time() - train_start:.0f}s)",
                flush=True,
            )

    for name, model in models.items():
        r = results[name]
        if not r["validation"] or r["validation"][-1]["step"] != steps_done:
            r["validation"].append({"step": steps_done, "loss": evaluate(model, eval_batches)})
        final = r["validation"][-1]["loss"]
        r["final_validation_loss"] = final
        r["converged"] = (not r["diverged"]) and math.isfinite(final) and final <= 0.9 * unigram
        r["seconds_per_step"] = r["seconds"] / max(steps_done, 1)

    report = {
        "claim": "Xu et al. (arXiv 2007.06257): depth-wise LSTM lets deep Transformers converge",
        "criterion": "converged = final validation CE <= 0.9 x unigram CE of the training targets",
        "args": json.loads(json.dumps(vars(args), default=str)),
        "steps_done": steps_done,
        "unigram_cross_entropy": unigram,
        "train_pairs": len(train),
        "eval_pairs": len(validation),
        "vocab_size": vocab_size,
        "total_wall_seconds": time.time() - start,
        "torch": torch.__version__,
        "machine": f"{platform.machine()} CPU, torch threads = {torch.get_num_threads()}",
        "results": results,
    }
    for path in args.merge:
        try:
            merge_earlier_run(report, path)
        except ValueError as error:  # keep this run's results even if an earlier one does not fit
            print(f"not merged: {error}", flush=True)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{args.tag}.json").write_text(json.dumps(report, indent=2))
    write_markdown(report, args.out_dir / f"{args.tag}.md")
    plot(report, args.out_dir / f"{args.tag}.png")
    summary_keys = ("final_validation_loss", "converged", "seconds_per_step")
    print(json.dumps({name: {key: r[key] for key in summary_keys} for name, r in results.items()}))


def merge_earlier_run(report: dict, path: Path) -> None:
    """Add the models of an earlier run to ``report`` after checking that the runs are comparable
    (same settings, same number of steps, same data and tokenizer as seen by the unigram loss).
    Batches and initialisations are then identical; dropout masks are not, since models trained
    in lockstep share the random stream."""
    earlier = json.loads(path.read_text())
    for key in COMPARABLE:
        if str(earlier["args"][key]) != str(report["args"][key]):
            raise ValueError(f"{path}: {key} = {earlier['args'][key]} differs from this run's {report['args'][key]}.")
    if earlier["steps_done"] != report["steps_done"]:
        raise ValueError(f"{path} ran {earlier['steps_done']} steps, this run {report['steps_done']}.")
    if abs(earlier["unigram_cross_entropy"] - report["unigram_cross_entropy"]) > 1e-9:
        raise ValueError(f"{path} saw different data or tokenization (unigram CE differs).")
    for name, result in earlier["results"].items():
        if name not in report["results"]:
            report["results"][name] = {**result, "from": str(path)}


def write_markdown(report: dict, path: Path) -> None:
    args = report["args"]
    lines = [
        "# Deep convergence: residual post-norm vs depth-wise LSTM",
        "",
        f"{args['layers']} encoder + {args['layers']} decoder layers, d_model {args['d_model']}, "
        f"{args['heads']} heads, Ding En->De ({report['train_pairs']} training pairs, vocab {report['vocab_size']}), "
        f"batch {args['batch_size']}, "
        f"Adam lr {args['lr']} ({args['warmup']} warmup steps, then inverse sqrt), dropout {args['dropout']}, "
        f"seed {args['seed']}, {report['steps_done']} steps each, {report['machine']}. Produced by "
        f"`benchmarks/deep_convergence.py`; raw numbers in `{args.get('tag', 'deep_convergence')}.json`.",
        "",
        f"Unigram baseline (target token frequencies): {report['unigram_cross_entropy']:.3f} nats/token. "
        f"Criterion: {report['criterion']}.",
        "",
        "| model | parameters | first logged train loss | last logged train loss | final validation loss "
        "| converged | s/step |",
        "| --- | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for name, r in report["results"].items():
        name = f"{name} (from `{Path(r['from']).name}`)" if "from" in r else name
        first = r["train"][0]["loss"] if r["train"] else float("nan")
        last = r["train"][-1]["loss"] if r["train"] else float("nan")
        lines.append(
            f"| {name} | {r['parameters']:,} | {first:.3f} | {last:.3f} | {r['final_validation_loss']:.3f} | "
            f"{'yes' if r['converged'] else 'no'}{' (diverged)' if r['diverged'] else ''} "
            f"| {r['seconds_per_step']:.2f} |"
        )
    if any("from" in r for r in report["results"].values()):
        lines += ["", "Rows marked *from* come from an earlier run (same batches and initialisation); their s/step was "
                  "measured under that run's machine load."]
    lines.append("")
    path.write_text("\n".join(lines))


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_grad) = plt.subplots(1, 2, figsize=(12, 4.5))
    spare_colors = iter(plt.rcParams["axes.prop_cycle"].by_key()["color"][4:])
    for name, r in report["results"].items():
        steps = [e["step"] for e in r["train"]]
        color = COLORS.get(name) or next(spare_colors, "tab:gray")
        ax_loss.plot(steps, [e["loss"] for e in r["train"]], color=color, label=f"{name} (train)")
        ax_loss.plot(
            [e["step"] for e in r["validation"]], [e["loss"] for e in r["validation"]], "o--",
            color=color, label=f"{name} (validation)",
        )
        bottom = [e["grad_norm_encoder_layer0"] for e in r["train"]]
        top = [e["grad_norm_decoder_top_layer"] for e in r["train"]]
        ax_grad.semilogy(steps, bottom, color=color, label=f"{name}: encoder layer 0")
        ax_grad.semilogy(steps, top, ":", color=color, label=f"{name}: top decoder layer")
    ax_loss.axhline(report["unigram_cross_entropy"], color="grey", linestyle=":", label="unigram baseline")
    depth, width = report["args"]["layers"], report["args"]["d_model"]
    ax_loss.set(xlabel="step", ylabel="cross-entropy (nats/token)", title=f"{depth}+{depth} layers, d_model {width}")
    ax_grad.set(xlabel="step", ylabel="gradient norm", title="gradient reaching the bottom / top layer")
    ax_loss.legend(fontsize=8)
    ax_grad.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
