"""The compression story of recurrent stacking, measured on the built-in Ding EN->DE corpus.

Dabre & Fujita (arXiv 2106.10002) report that a recurrently stacked model (one layer's parameters
reused at every depth step) loses BLEU against a vanilla model of the same depth when trained from
scratch, and that transfer learning from the vanilla model plus sequence-level knowledge
distillation recovers most of it. This script runs that comparison end to end:

    vanilla 6+6                              trained from scratch (also the teacher)
    recurrent 1x6, from scratch              same depth, one shared layer per stack
    recurrent 1x6, from transfer             shared layer = mean of the teacher's layers
    recurrent 1x6, from transfer + seq. KD   ... trained on the teacher's beam-search outputs

Every model gets the same step budget, batch size and schedule on the same training subset
(the transfer/KD rows additionally inherit the teacher's training, which is the point of them;
the table lists the total steps behind each row). Reported: parameters, BLEU and chrF (sacrebleu
through ``training.metrics``) on a test subset, and beam-search decoding speed on one CPU thread.

The budget is deliberately tiny (width 64, 2400 steps per model) so the whole script runs in about
25 minutes on one shared CPU thread; absolute BLEU is therefore low and only the comparison between
rows is meaningful. Each stage stores its result (tokenizer, trained models, KD translations,
scores in ``<work_dir>/results.json``), so an interrupted run resumes where it stopped.

Usage::

    PYTHONPATH=. python benchmarks/compression.py                # full run, ~25 min
    PYTHONPATH=. python benchmarks/compression.py --smoke        # seconds, checks the plumbing
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import datasets
import torch
import transformers
from transformers import (
    AutoModelForSeq2SeqLM,
    DataCollatorForSeq2Seq,
    PreTrainedTokenizerFast,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
)

from hf_fusion import (
    FusionTransformerConfig,
    FusionTransformerForConditionalGeneration,
    RecurrentStackingConfig,
    RecurrentStackingForConditionalGeneration,
    transfer_from_pretrained,
)
from training.corpora import build_default_corpus, take_slice
from training.distill import distill_dataset
from training.metrics import load_translation_metric
from training.tokenizer import train_tokenizer

logger = logging.getLogger("compression")
REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Budget:
    """Everything that defines the experiment (written into the results)."""

    corpus: str = "ding"
    train_pairs: int | None = None  # None: the whole (filtered) training split
    max_source_words: int | None = 8
    test_pairs: int = 500
    vocab_size: int = 2000
    d_model: int = 64
    ffn_dim: int = 256
    heads: int = 4
    depth: int = 6
    positions: str = "sinusoidal"
    pre_norm: bool = False
    dropout: float = 0.0
    label_smoothing: float = 0.1
    max_length: int = 48
    steps: int = 2400
    batch_size: int = 32
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    num_beams: int = 4
    max_new_tokens: int = 40
    kd_batch_size: int = 64
    speed_sentences: int = 128
    speed_batch_size: int = 32
    speed_rounds: int = 3
    seed: int = 0


SMOKE = Budget(
    train_pairs=64,
    test_pairs=16,
    vocab_size=200,
    d_model=32,
    ffn_dim=64,
    steps=4,
    batch_size=8,
    warmup_steps=1,
    max_new_tokens=8,
    kd_batch_size=16,
    speed_sentences=8,
    speed_batch_size=8,
    speed_rounds=1,
)

ROWS = {
    "vanilla": "vanilla 6+6",
    "recurrent_scratch": "recurrent 1x6, from scratch",
    "recurrent_transfer": "recurrent 1x6, from transfer (mean of layers)",
    "recurrent_transfer_kd": "recurrent 1x6, from transfer + sequence-level KD",
}


def model_config(budget: Budget, vocab_size: int, shared: bool) -> FusionTransformerConfig:
    """Post-norm (BART-style) Transformer with tied embeddings and the budget's positions.

    Post-norm because in pilot runs a pre-norm model at lr 1.5e-3..3e-3 let the encoder's residual
    stream grow an input-independent component, so that after its final LayerNorm the encoder
    output no longer depended on the source and the decoder degenerated into a language model."""
    fields = {
        "vocab_size": vocab_size,
        "d_model": budget.d_model,
        "encoder_layers": budget.depth,
        "decoder_layers": budget.depth,
        "encoder_attention_heads": budget.heads,
        "decoder_attention_heads": budget.heads,
        "encoder_ffn_dim": budget.ffn_dim,
        "decoder_ffn_dim": budget.ffn_dim,
        "max_position_embeddings": max(64, budget.max_length + budget.max_new_tokens),
        "dropout": budget.dropout,
        "label_smoothing": budget.label_smoothing,
        "normalize_before": budget.pre_norm,
        "add_final_layer_norm": budget.pre_norm,
        "scale_embedding": True,
        # Fixed sinusoidal positions (the original Transformer's): learned ones start at std 0.02
        # next to sqrt(d)-scaled token embeddings, and a short run never learns word order.
        "position_embedding_type": budget.positions,
    }
    return RecurrentStackingConfig(**fields) if shared else FusionTransformerConfig(**fields)


class Experiment:
    """The stages of the benchmark, each skipped when its result is already on disk."""

    def __init__(self, budget: Budget, work_dir: Path):
        self.budget = budget
        self.work_dir = work_dir
        self.results_path = work_dir / "results.json"
        self.results = json.loads(self.results_path.read_text()) if self.results_path.exists() else {}
        if self.results.get("budget", asdict(budget)) != asdict(budget):
            raise SystemExit(f"{work_dir} holds a run with another budget; pass another --work_dir.")
        self.results["budget"] = asdict(budget)
        self.results.setdefault("rows", {})
        self.results.setdefault("stage_seconds", {})

    def save(self) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.results_path.write_text(json.dumps(self.results, indent=2))

    def timed(self, stage: str, seconds: float) -> None:
        self.results["stage_seconds"][stage] = round(seconds, 1)
        logger.info("stage %s took %.0f s", stage, seconds)
        self.save()

    # --- data ---------------------------------------------------------------------------------

    def data(self) -> None:
        corpus = build_default_corpus(self.budget.corpus)
        if self.budget.max_source_words is not None:
            # Short sentences only: the budget is too small to learn alignment on long ones.
            corpus = corpus.filter(lambda pair: len(pair["source"].split()) <= self.budget.max_source_words)
        train_pairs = len(corpus["train"]) if self.budget.train_pairs is None else self.budget.train_pairs
        corpus = take_slice(corpus, train_pairs, self.budget.test_pairs)
        self.train = corpus["train"]
        self.test_sources, self.test_targets = list(corpus["test"]["source"]), list(corpus["test"]["target"])
        tokenizer_dir = self.work_dir / "tokenizer"
        if tokenizer_dir.exists():
            self.tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
        else:
            self.tokenizer = train_tokenizer(
                list(self.train["source"]) + list(self.train["target"]), vocab_size=self.budget.vocab_size
            )
            self.tokenizer.save_pretrained(tokenizer_dir)
        self.results["data"] = {
            "corpus": self.budget.corpus,
            "max_source_words": self.budget.max_source_words,
            "train_pairs": len(self.train),
            "test_pairs": len(self.test_sources),
            "vocab_size": len(self.tokenizer),
        }
        self.save()

    def tokenize(self, dataset: datasets.Dataset) -> datasets.Dataset:
        def encode(batch: dict) -> dict:
            return self.tokenizer(
                batch["source"], text_target=batch["target"], truncation=True, max_length=self.budget.max_length
            )

        return dataset.map(encode, batched=True, remove_columns=dataset.column_names)

    # --- training -----------------------------------------------------------------------------

    def train_model(self, name: str, model: torch.nn.Module, train: datasets.Dataset, inherited_steps: int = 0) -> None:
        """Train ``model`` for the step budget and save it to ``<work_dir>/models/<name>``."""
        output_dir = self.work_dir / "models" / name
        if (output_dir / "config.json").exists():
            logger.info("%s: already trained", name)
            return
        start = time.time()
        budget = self.budget
        args = Seq2SeqTrainingArguments(
            output_dir=str(self.work_dir / "checkpoints" / name),
            max_steps=budget.steps,
            per_device_train_batch_size=budget.batch_size,
            learning_rate=budget.learning_rate,
            warmup_steps=budget.warmup_steps,
            lr_scheduler_type="linear",
            weight_decay=0.01,
            train_sampling_strategy="group_by_length",
            logging_steps=max(1, budget.steps // 10),
            save_strategy="steps",
            save_steps=max(1, budget.steps // 3),
            save_total_limit=1,
            seed=budget.seed,
            use_cpu=True,
            report_to=[],
            disable_tqdm=True,
            dataloader_num_workers=0,
        )
        trainer = Seq2SeqTrainer(
            model=model,
            args=args,
            train_dataset=self.tokenize(train),
            data_collator=DataCollatorForSeq2Seq(self.tokenizer, model=model),
        )
        resume = any(Path(args.output_dir).glob("checkpoint-*"))
        result = trainer.train(resume_from_checkpoint=True if resume else None)
        model.config.use_cache = True
        model.save_pretrained(output_dir)
        self.results["rows"].setdefault(name, {}).update(
            {
                "train_loss": round(result.training_loss, 4),
                "steps": budget.steps,
                "total_steps": budget.steps + inherited_steps,
            }
        )
        self.timed(f"train_{name}", time.time() - start)

    def load(self, name: str) -> torch.nn.Module:
        return AutoModelForSeq2SeqLM.from_pretrained(self.work_dir / "models" / name).eval()

    # --- evaluation ---------------------------------------------------------------------------

    @torch.no_grad()
    def translate(self, model: torch.nn.Module, sources: list[str], batch_size: int) -> list[str]:
        outputs = []
        for start in range(0, len(sources), batch_size):
            encoded = self.tokenizer(
                sources[start : start + batch_size],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=self.budget.max_length,
            )
            generated = model.generate(
                **encoded, num_beams=self.budget.num_beams, max_new_tokens=self.budget.max_new_tokens
            )
            outputs.extend(text.strip() for text in self.tokenizer.batch_decode(generated, skip_special_tokens=True))
        return outputs

    @torch.no_grad()
    def test_nll(self, model: torch.nn.Module) -> float:
        """Teacher-forced cross-entropy per reference token on the test pairs (nats, no label
        smoothing): a smooth quality measure that still separates models whose BLEU is near 0."""
        total, tokens = 0.0, 0
        for start in range(0, len(self.test_sources), 50):
            encoded = self.tokenizer(
                self.test_sources[start : start + 50],
                text_target=self.test_targets[start : start + 50],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=self.budget.max_length,
            )
            labels = encoded["labels"].masked_fill(encoded["labels"] == self.tokenizer.pad_token_id, -100)
            logits = model(
                input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"], labels=labels
            ).logits
            total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum").item()
            tokens += int((labels != -100).sum())
        return total / tokens

    def evaluate(self, name: str) -> None:
        row = self.results["rows"].setdefault(name, {})
        if "bleu" in row:
            return
        start = time.time()
        model = self.load(name)
        hypotheses = self.translate(model, self.test_sources, batch_size=50)
        nll = self.test_nll(model)
        scores = load_translation_metric().compute(predictions=hypotheses, references=self.test_targets)
        row.update(
            {
                "label": ROWS[name],
                "parameters": model.num_parameters(),
                "non_embedding_parameters": model.num_parameters(exclude_embeddings=True),
                "bleu": round(scores["bleu"], 2),
                "chrf": round(scores["chrf"], 2),
                "test_nll": round(nll, 4),
                "mean_output_tokens": round(
                    statistics.mean(len(self.tokenizer(text)["input_ids"]) for text in hypotheses), 2
                ),
                "examples": [
                    {"source": s, "reference": r, "hypothesis": h}
                    for s, r, h in list(zip(self.test_sources, self.test_targets, hypotheses))[:3]
                ],
            }
        )
        logger.info("%s: BLEU %.2f chrF %.2f test NLL %.3f", name, row["bleu"], row["chrf"], row["test_nll"])
        self.timed(f"evaluate_{name}", time.time() - start)

    def speed(self) -> None:
        """Beam-search decoding speed, models interleaved over several rounds (the CPU is shared, so
        load changes over time; interleaving exposes every model to the same conditions) and the
        fastest round kept."""
        names = [name for name in ROWS if name in self.results["rows"] and "bleu" in self.results["rows"][name]]
        if all("sentences_per_second" in self.results["rows"][name] for name in names):
            return
        start = time.time()
        models = {name: self.load(name) for name in names}
        sources = self.test_sources[: self.budget.speed_sentences]
        self.translate(
            models[names[0]], sources[: self.budget.speed_batch_size], self.budget.speed_batch_size
        )  # warm-up
        times: dict[str, list[float]] = {name: [] for name in names}
        for _ in range(self.budget.speed_rounds):
            for name, model in models.items():
                tic = time.perf_counter()
                self.translate(model, sources, self.budget.speed_batch_size)
                times[name].append(time.perf_counter() - tic)
        for name in names:
            best = min(times[name])
            self.results["rows"][name].update(
                {
                    "sentences_per_second": round(len(sources) / best, 2),
                    "decode_seconds_rounds": [round(t, 2) for t in times[name]],
                }
            )
        self.timed("speed", time.time() - start)

    # --- the experiment -----------------------------------------------------------------------

    def run(self) -> None:
        torch.manual_seed(self.budget.seed)
        start = time.time()
        self.data()
        vocab = len(self.tokenizer)

        self.train_model(
            "vanilla",
            FusionTransformerForConditionalGeneration(model_config(self.budget, vocab, shared=False)),
            self.train,
        )
        self.evaluate("vanilla")

        torch.manual_seed(self.budget.seed)
        scratch = RecurrentStackingForConditionalGeneration(model_config(self.budget, vocab, shared=True))
        self.train_model("recurrent_scratch", scratch, self.train)
        self.evaluate("recurrent_scratch")

        teacher = self.load("vanilla")
        self.train_model(
            "recurrent_transfer", transfer_from_pretrained(teacher, block_source="mean"), self.train, self.budget.steps
        )
        self.evaluate("recurrent_transfer")

        if not (self.work_dir / "models" / "recurrent_transfer_kd" / "config.json").exists():
            tic = time.time()
            distilled = distill_dataset(
                teacher,
                self.tokenizer,
                self.train,
                cache_dir=self.work_dir / "kd_cache",
                batch_size=self.budget.kd_batch_size,
                max_source_length=self.budget.max_length,
                generation_kwargs={"num_beams": self.budget.num_beams, "max_new_tokens": self.budget.max_new_tokens},
            )
            self.timed("kd_teacher_translations", time.time() - tic)
            student = transfer_from_pretrained(teacher, block_source="mean")
            self.train_model("recurrent_transfer_kd", student, distilled, self.budget.steps)
        self.evaluate("recurrent_transfer_kd")

        self.speed()
        self.results["environment"] = {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "torch_threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(),
        }
        self.results["stage_seconds"]["total_this_invocation"] = round(time.time() - start, 1)
        self.save()


def markdown(results: dict) -> str:
    """The results table and the budget as a Markdown report."""
    budget = results["budget"]
    rows = results["rows"]
    vanilla = rows.get("vanilla", {})
    lines = [
        "# Recurrent stacking: compression, transfer learning and distillation (measured)",
        "",
        "Produced by `benchmarks/compression.py` (numbers below come from `compression.json`). Corpus: Ding EN->DE",
        (
            f'example sentences (`training.corpora.build_default_corpus("{budget["corpus"]}")`), pairs whose English side '
            f"has at most {budget['max_source_words']} words: {results['data']['train_pairs']} training pairs, the first "
            f"{results['data']['test_pairs']} test pairs; joint unigram tokenizer, {results['data']['vocab_size']} pieces."
        ),
        "",
        (
            "| model | parameters | vs vanilla | BLEU | chrF | test NLL | train steps (incl. teacher) | train loss "
            "| decode sent/s | mean output tokens |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, label in ROWS.items():
        row = rows.get(name)
        if not row or "bleu" not in row:
            lines.append(f"| {label} | not run | | | | | | | | |")
            continue
        ratio = f"{row['parameters'] / vanilla['parameters']:.0%}" if vanilla.get("parameters") else ""
        speed = row.get("sentences_per_second", "")
        lines.append(
            f"| {label} | {row['parameters']:,} | {ratio} | {row['bleu']:.2f} | {row['chrf']:.2f} | {row['test_nll']:.3f} | "
            f"{row['steps']} ({row['total_steps']}) | {row['train_loss']:.3f} | {speed} | {row['mean_output_tokens']} |"
        )
    lines += [
        "",
        "## Budget (identical for every row)",
        "",
        (
            f"- Model: {'pre' if budget['pre_norm'] else 'post'}-norm Transformer with {budget['positions']} positions, "
            f"d_model {budget['d_model']}, FFN {budget['ffn_dim']}, {budget['heads']} heads, "
            f"{budget['depth']} encoder + {budget['depth']} decoder steps, tied embeddings, dropout {budget['dropout']}, "
            f"label smoothing {budget['label_smoothing']}. Recurrent rows: one parameter block per stack "
            "(`RecurrentStackingConfig()`), run at all 6 steps."
        ),
        (
            f"- Training: `Seq2SeqTrainer`, {budget['steps']} steps of batch {budget['batch_size']} (AdamW, lr "
            f"{budget['learning_rate']}, {budget['warmup_steps']} warmup steps then linear decay, weight decay 0.01), "
            f"sources/targets truncated to {budget['max_length']} tokens, seed {budget['seed']}, one CPU thread."
        ),
        (
            '- Transfer: `hf_fusion.transfer_from_pretrained(vanilla, block_source="mean")`: each shared layer starts as '
            "the mean of the trained vanilla model's 6 layers; embeddings, positions, norms and output bias are copied."
        ),
        (
            f"- Sequence-level KD: the vanilla teacher translates the {results['data']['train_pairs']} training sources "
            f"(beam {budget['num_beams']}, `training.distill.distill_dataset`); the student trains on those outputs."
        ),
        (
            f"- Evaluation: beam {budget['num_beams']}, at most {budget['max_new_tokens']} new tokens; BLEU and chrF from "
            "sacrebleu (`training.metrics.load_translation_metric`). Decoding speed: "
            f"{budget['speed_sentences']} test sentences in batches of {budget['speed_batch_size']}, beam "
            f"{budget['num_beams']}, models interleaved over {budget['speed_rounds']} rounds, fastest round kept."
        ),
        (
            "- test NLL: teacher-forced cross-entropy per reference token of the test pairs (nats, no label smoothing). "
            "train loss: the Trainer's mean label-smoothed loss over the whole run, on the row's own training targets "
            "(teacher outputs for the KD row, so not comparable with the others)."
        ),
        "",
        "## Caveats",
        "",
        (
            "- The budget is tiny (a few minutes of one shared CPU thread per model): absolute BLEU is far below what "
            "these architectures reach; only the comparison between rows is informative, and one seed gives no error bars."
        ),
        (
            "- Recurrent stacking saves parameters, not computation: all rows run 6+6 layer steps, so decoding speed "
            "differs only through output length, memory traffic and noise from other processes on the shared CPU."
        ),
        "- The transfer and KD rows also benefit from the teacher's training steps (shown in brackets).",
        (
            "- Pilot runs (same script, not shown) with a pre-norm model at lr 1.5e-3..3e-3, 300..1500 steps, ended "
            "with an encoder whose output no longer depended on the source (every translation the same sentence, "
            "BLEU < 0.3); the post-norm model at lr 1e-3 used here does not have that problem."
        ),
        (
            "- Dropout is off: a few epochs at this size do not overfit, and dropout would only slow the little "
            "training the budget allows."
        ),
        "",
        "## Stage timings (seconds)",
        "",
        ", ".join(f"{stage}: {seconds}" for stage, seconds in results.get("stage_seconds", {}).items()),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work_dir", type=Path, default=None, help="default: runs/compression[-smoke]")
    parser.add_argument("--results_dir", type=Path, default=None, help="default: benchmarks/results (smoke: work_dir)")
    parser.add_argument("--smoke", action="store_true", help="a seconds-long run of every stage with a toy budget")
    args = parser.parse_args(argv)
    work_dir = args.work_dir or REPO_ROOT / "runs" / ("compression-smoke" if args.smoke else "compression")
    results_dir = args.results_dir or (work_dir if args.smoke else REPO_ROOT / "benchmarks" / "results")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stdout)
    transformers.logging.set_verbosity_warning()
    torch.set_num_threads(1)

    budget = SMOKE if args.smoke else Budget()
    experiment = Experiment(budget, work_dir)
    try:
        experiment.run()
    finally:
        if "data" in experiment.results:
            results_dir.mkdir(parents=True, exist_ok=True)
            (results_dir / "compression.json").write_text(json.dumps(experiment.results, indent=2))
            (results_dir / "compression.md").write_text(markdown(experiment.results))


if __name__ == "__main__":
    main()
