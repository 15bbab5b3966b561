"""The main command's model against Hugging Face's BART of the same size, same pipeline, same time.

Both runs read ``training/configs/default.yaml`` (same data, tokenizer, batches, optimizer,
schedule, time budget, label smoothing 0.1 and beam search) and differ only in the model:

- ``fusion_transformer``: the default config's model (pre-norm, scaled embeddings, final
  LayerNorms);
- ``bart``: ``BartForConditionalGeneration`` with the same width, depth, heads, feed-forward width,
  vocabulary and dropout (BART is post-norm with an embedding LayerNorm and has no pre-norm
  option). BART has no label smoothing of its own, so its loss is replaced by the same smoothed
  token cross-entropy the hf_fusion head uses.

The two runs are started at the same time, one torch thread each, so they share the machine's
load equally. Results go to ``benchmarks/results/main_vs_bart.{md,json}``.

    PYTHONPATH=. python benchmarks/main_vs_bart.py [--minutes 11]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "training" / "configs" / "default.yaml"
RESULTS = Path(__file__).with_name("results")
MODELS = ("fusion_transformer", "bart")


def bart_builder(model_config: dict):
    """``tokenizer -> BartForConditionalGeneration`` sized like the hf_fusion model of ``model_config``."""
    import torch
    from transformers import BartConfig, BartForConditionalGeneration
    from transformers.models.bart.modeling_bart import shift_tokens_right

    from hf_fusion.heads import token_cross_entropy

    class SmoothedBart(BartForConditionalGeneration):
        """BART whose loss is the smoothed token cross-entropy of hf_fusion's LM head."""

        def forward(
            self, input_ids=None, attention_mask=None, decoder_input_ids=None, labels=None, num_items_in_batch=None, **kwargs
        ):
            if labels is not None and decoder_input_ids is None:
                decoder_input_ids = shift_tokens_right(labels, self.config.pad_token_id, self.config.decoder_start_token_id)
            output = super().forward(
                input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids, **kwargs
            )
            if labels is not None:
                output.loss = token_cross_entropy(
                    output.logits, labels, model_config.get("label_smoothing", 0.0), num_items_in_batch
                )
            return output

    def build(tokenizer):
        config = BartConfig(
            vocab_size=len(tokenizer),
            d_model=model_config["d_model"],
            encoder_layers=model_config["encoder_layers"],
            decoder_layers=model_config["decoder_layers"],
            encoder_attention_heads=model_config["encoder_attention_heads"],
            decoder_attention_heads=model_config["decoder_attention_heads"],
            encoder_ffn_dim=model_config["encoder_ffn_dim"],
            decoder_ffn_dim=model_config["decoder_ffn_dim"],
            max_position_embeddings=model_config["max_position_embeddings"],
            dropout=model_config.get("dropout", 0.1),
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.eos_token_id,
            forced_eos_token_id=None,
        )
        torch.manual_seed(0)
        return SmoothedBart(config)

    return build


def worker(name: str, config: Path, minutes: float, output_dir: Path) -> None:
    import torch

    from training.arguments import parse_experiment
    from training.pipeline import train

    torch.set_num_threads(1)
    experiment = parse_experiment(
        config,
        ["--output_dir", str(output_dir), "--max_train_minutes", str(minutes), "--disable_tqdm", "true"],
    )
    builder = bart_builder(experiment.model.model_config) if name == "bart" else None
    start = time.perf_counter()
    result = train(experiment, model_builder=builder, export=False)
    metrics = {**result.metrics, "wall_seconds": time.perf_counter() - start}
    (output_dir / "main_vs_bart.json").write_text(json.dumps(metrics, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=None, help="time budget (default: the config's)")
    parser.add_argument("--output_dir", default=str(REPO / "runs" / "main_vs_bart"))
    parser.add_argument("--config", default=str(CONFIG), help="experiment file (a debug config for a smoke test)")
    parser.add_argument("--worker", choices=MODELS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    from training.arguments import load_settings

    config = Path(args.config).resolve()
    minutes = args.minutes if args.minutes is not None else load_settings(config)["max_train_minutes"]
    if args.worker:
        worker(args.worker, config, minutes, Path(args.output_dir) / args.worker)
        return

    load_before = os.getloadavg()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    logs = {name: output_dir / f"{name}.log" for name in MODELS}
    processes = {}
    for name in MODELS:
        with open(logs[name], "w") as log:
            processes[name] = subprocess.Popen(
                [sys.executable, __file__, "--worker", name, "--config", str(config), "--minutes", str(minutes),
                 "--output_dir", str(output_dir)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
    for name, process in processes.items():
        if process.wait() != 0:
            raise SystemExit(f"The {name} run failed; see {logs[name]}")
    results = {name: json.loads((Path(args.output_dir) / name / "main_vs_bart.json").read_text()) for name in MODELS}
    report = {
        "config": str(config.relative_to(REPO)),
        "minutes": minutes,
        "torch_threads_per_run": 1,
        "cpu_count": os.cpu_count(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "results": results,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "main_vs_bart.json").write_text(json.dumps(report, indent=2) + "\n")
    rows = "\n".join(
        f"| {name} | {r['test_bleu']:.2f} | {r['test_chrf']:.2f} | {r.get('best_validation_bleu', float('nan')):.2f} | "
        f"{r['train_steps']} | {r['train_runtime'] / 60:.1f} | {r['wall_seconds'] / 60:.1f} |"
        for name, r in results.items()
    )
    (RESULTS / "main_vs_bart.md").write_text(
        f"""# The main command's model vs BART of the same size

`benchmarks/main_vs_bart.py`: both models trained by the same pipeline with
`{report['config']}` (Ding corpus, same tokenizer, batches, AdamW, inverse-sqrt schedule, label
smoothing 0.1) for the same time budget of {minutes:g} minutes each, started together with one torch
thread each on a {os.cpu_count()}-core machine shared with other jobs (load average
{load_before[0]:.1f} before, {report['load_average_after'][0]:.1f} after). Test set: 1,000 held-out
pairs, beam 5, sacreBLEU.

| model | test BLEU | test chrF | best validation BLEU (greedy) | steps | training min | wall min |
|---|---|---|---|---|---|---|
{rows}

`fusion_transformer` is the default config's model (pre-norm, scaled embeddings); `bart` is
`BartForConditionalGeneration` with the same width, depth, heads, feed-forward width, vocabulary
and dropout (post-norm, as BART is), its loss replaced by the same smoothed cross-entropy.
"""
    )
    print((RESULTS / "main_vs_bart.md").read_text())


if __name__ == "__main__":
    main()
