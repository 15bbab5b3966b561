"""Training throughput of three pipelines on the same model and data, measured in the same run.

- ``bare``: a plain forward / backward / AdamW loop over pre-collated, length-bucketed batches
  (no data loading, no Trainer): the ceiling of what the CPU can do with this model.
- ``ours``: ``hf-fusion``'s pipeline: ``FusionSeq2SeqTrainer`` over ``TokenizedPairs`` with the
  length-bucketing batch sampler and ``PairCollator`` (what ``hf-fusion train`` runs).
- ``hf_default``: the stock recipe: ``Seq2SeqTrainer``, ``datasets`` columns, random batches,
  ``DataCollatorForSeq2Seq``.

All three train the same fusion_transformer (d_model 128, 2+2 layers, 4k vocabulary, BART
layout) on the Ding corpus with batches of 64 sentences. The unit is *real* tokens per second:
non-pad source + target tokens processed by the model, counted by a forward hook on the model
(so every pipeline is counted the same way). The machine may be shared, so the three are
interleaved: each round runs every pipeline for the same number of steps, and the report gives
the median over rounds.

    PYTHONPATH=. python benchmarks/pipeline_throughput.py [--threads 1] [--rounds 3] [--steps 40]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import DataCollatorForSeq2Seq, Seq2SeqTrainer, Seq2SeqTrainingArguments, TrainerCallback

import hf_fusion
from training.batching import LengthBucketBatchSampler, PairCollator, TokenizedPairs, padded_fraction, tokenize_pairs
from training.corpora import build_default_corpus
from training.tokenizer import train_tokenizer
from training.trainer import FusionSeq2SeqTrainer

RESULTS = Path(__file__).with_name("results")
MODEL = dict(
    d_model=128,
    encoder_layers=2,
    decoder_layers=2,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=512,
    decoder_ffn_dim=512,
    max_position_embeddings=256,
    dropout=0.1,
)
BATCH = 64
WARMUP_STEPS = 5


class TokenCounter:
    """Counts the real tokens of every training forward (a pre-hook on the model)."""

    def __init__(self, model: torch.nn.Module):
        self.tokens = 0
        model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        if module.training and kwargs.get("labels") is not None:
            self.tokens += int(kwargs["attention_mask"].sum()) + int((kwargs["labels"] != -100).sum())


class Stopwatch(TrainerCallback):
    """Times steps WARMUP_STEPS .. WARMUP_STEPS + steps of a Trainer run and the tokens in them."""

    def __init__(self, counter: TokenCounter, steps: int):
        self.counter, self.steps = counter, steps
        self.start = self.tokens0 = None
        self.result: tuple[float, int] | None = None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == WARMUP_STEPS:
            self.start, self.tokens0 = time.perf_counter(), self.counter.tokens
        elif state.global_step == WARMUP_STEPS + self.steps:
            self.result = (time.perf_counter() - self.start, self.counter.tokens - self.tokens0)
            control.should_training_stop = True


def new_model(vocab_size: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = hf_fusion.FusionTransformerConfig(vocab_size=vocab_size, **MODEL)
    return hf_fusion.FusionTransformerForConditionalGeneration(config)


def trainer_args(output_dir: str, steps: int) -> Seq2SeqTrainingArguments:
    return Seq2SeqTrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=BATCH,
        learning_rate=5e-4,
        max_steps=WARMUP_STEPS + steps + 1,
        logging_steps=50,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        dataloader_pin_memory=False,
        seed=0,
    )


def run_bare(batches: list[dict], vocab_size: int, steps: int) -> tuple[float, int]:
    model = new_model(vocab_size, seed=0).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4)
    tokens, start = 0, None
    for step, batch in enumerate(batches[: WARMUP_STEPS + steps]):
        if step == WARMUP_STEPS:
            tokens, start = 0, time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += int(batch["attention_mask"].sum()) + int((batch["labels"] != -100).sum())
    return time.perf_counter() - start, tokens


def run_trainer(kind: str, data: dict, vocab_size: int, steps: int, workdir: str) -> tuple[float, int]:
    model = new_model(vocab_size, seed=0)
    counter = TokenCounter(model)
    stopwatch = Stopwatch(counter, steps)
    args = trainer_args(os.path.join(workdir, kind), steps)
    if kind == "ours":
        trainer = FusionSeq2SeqTrainer(
            model=model,
            args=args,
            train_dataset=data["pairs"],
            data_collator=PairCollator(data["tokenizer"].pad_token_id),
            callbacks=[stopwatch],
        )
    else:
        trainer = Seq2SeqTrainer(
            model=model,
            args=args,
            train_dataset=data["columns"],
            data_collator=DataCollatorForSeq2Seq(data["tokenizer"], model=model),
            processing_class=data["tokenizer"],
            callbacks=[stopwatch],
        )
    trainer.train()
    assert stopwatch.result is not None, f"{kind}: the run ended before the timed steps"
    return stopwatch.result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40, help="timed steps per pipeline per round")
    parser.add_argument("--vocab_size", type=int, default=4000)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    transformers.utils.logging.set_verbosity_error()
    load_before = os.getloadavg()

    corpus = build_default_corpus("ding")
    tokenizer = train_tokenizer(
        (text for column in ("source", "target") for text in corpus["train"][column]), vocab_size=args.vocab_size
    )
    tokenized = tokenize_pairs(corpus, tokenizer, 128, 128)
    pairs = TokenizedPairs.from_dataset(tokenized["train"])
    sampler = LengthBucketBatchSampler(pairs.source_lengths, pairs.target_lengths, None, BATCH, seed=0)
    collator = PairCollator(tokenizer.pad_token_id)
    bare_batches = [collator([pairs[i] for i in batch]) for batch in list(sampler)[: WARMUP_STEPS + args.steps]]
    data = {"pairs": pairs, "columns": tokenized["train"], "tokenizer": tokenizer}
    shuffled = np.random.default_rng(0).permutation(len(pairs))
    random_batches = [shuffled[i : i + BATCH].tolist() for i in range(0, len(pairs), BATCH)]

    measurements: dict[str, list[tuple[float, int]]] = {"bare": [], "ours": [], "hf_default": []}
    with tempfile.TemporaryDirectory() as workdir:
        for round_index in range(args.rounds):
            measurements["bare"].append(run_bare(bare_batches, len(tokenizer), args.steps))
            for kind in ("ours", "hf_default"):
                measurements[kind].append(run_trainer(kind, data, len(tokenizer), args.steps, workdir))
            print(f"round {round_index + 1}: " + ", ".join(
                f"{kind} {tokens / seconds:,.0f} tok/s" for kind, ((seconds, tokens), *_) in
                ((kind, values[-1:]) for kind, values in measurements.items())
            ), flush=True)

    summary = {}
    for kind, values in measurements.items():
        rates = [tokens / seconds for seconds, tokens in values]
        step_rates = [args.steps / seconds for seconds, _ in values]
        summary[kind] = {
            "real_tokens_per_second": statistics.median(rates),
            "steps_per_second": statistics.median(step_rates),
            "rounds": rates,
        }
    bare = summary["bare"]["real_tokens_per_second"]
    for kind in summary:
        summary[kind]["fraction_of_bare"] = summary[kind]["real_tokens_per_second"] / bare
    report = {
        "model": {**MODEL, "vocab_size": len(tokenizer), "parameters": new_model(len(tokenizer), 0).num_parameters()},
        "batch_sentences": BATCH,
        "timed_steps_per_round": args.steps,
        "rounds": args.rounds,
        "torch_threads": args.threads,
        "cpu_count": os.cpu_count(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "padding_fraction": {
            "length_bucketed": padded_fraction(pairs.source_lengths, pairs.target_lengths, sampler.batches),
            "random": padded_fraction(pairs.source_lengths, pairs.target_lengths, random_batches),
        },
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()},
        "results": summary,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "pipeline_throughput.json").write_text(json.dumps(report, indent=2) + "\n")
    rows = "\n".join(
        f"| {kind} | {values['real_tokens_per_second']:,.0f} | {values['steps_per_second']:.2f} | "
        f"{values['fraction_of_bare']:.0%} |"
        for kind, values in summary.items()
    )
    (RESULTS / "pipeline_throughput.md").write_text(
        f"""# Training pipeline throughput

`benchmarks/pipeline_throughput.py`: fusion_transformer (d_model 128, 2+2 layers, vocabulary
{len(tokenizer):,}, {report['model']['parameters']:,} parameters) on the Ding corpus, batches of {BATCH}
sentences, {args.threads} torch thread(s) on a {os.cpu_count()}-core machine shared with other jobs (load
average {load_before[0]:.1f} before, {report['load_average_after'][0]:.1f} after). Median of {args.rounds}
interleaved rounds of {args.steps} timed steps each (after {WARMUP_STEPS} warm-up steps).

| pipeline | real tokens/s | steps/s | of bare loop |
|---|---|---|---|
{rows}

Real tokens = non-pad source + target tokens. Padding per batch: {report['padding_fraction']['length_bucketed']:.1%}
with length-bucketed batches, {report['padding_fraction']['random']:.1%} with random batches.
`bare` is forward / backward / AdamW over pre-collated length-bucketed batches (no data
loading, no Trainer); `ours` is what `hf-fusion train` runs; `hf_default` is `Seq2SeqTrainer` +
`DataCollatorForSeq2Seq` with random batches. Steps/s are not comparable across pipelines
(a random batch carries more padding, so a step costs more); real tokens/s are.
"""
    )
    print((RESULTS / "pipeline_throughput.md").read_text())


if __name__ == "__main__":
    main()
