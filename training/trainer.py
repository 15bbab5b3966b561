"""``Seq2SeqTrainer`` for hf_fusion models: lean batching, loss components in the logs, BLEU/chrF.

What changes against the stock ``Seq2SeqTrainer`` (and why):

- Training batches come from :class:`~training.batching.LengthBucketBatchSampler` over
  :class:`~training.batching.TokenizedPairs`: length-bucketed, optionally under a token budget,
  padded to the batch (the stock random batches spend most of their compute on padding).
- ``loss_terms`` of the model output (named loss components, e.g. SurfaceFusion's two
  cross-entropies) are logged beside the loss by :class:`LossTermLogging`, the one implementation
  that E2S2 pretraining uses too; so is the throughput in real (non-pad) source + target tokens per
  second, summed over processes.
- Metrics are computed against the *raw* reference strings, not against references decoded from
  truncated label ids, so BLEU is the BLEU of the text; under DDP, over each example exactly once.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from functools import partial
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from transformers import EvalPrediction, Seq2SeqTrainer, TrainerCallback
from transformers.trainer_utils import seed_worker

from .batching import LABEL_PAD, LengthBucketBatchSampler, TokenizedPairs


class TranslationMetrics:
    """``compute_metrics`` for the Trainer: decode the generated ids, score them against raw text.

    ``references`` are the reference strings of the dataset being evaluated, in dataset order
    (the Trainer returns predictions in that order, across processes too); swap them with
    :meth:`scoring` to evaluate another split.
    """

    def __init__(self, tokenizer: Any, metric: Any, references: list[str]):
        self.tokenizer = tokenizer
        self.metric = metric
        self.references = references
        self.last_predictions: list[str] = []

    def decode(self, token_ids: np.ndarray) -> list[str]:
        """Ids (padded with -100 between batches by the Trainer) -> stripped strings."""
        token_ids = np.where(token_ids == LABEL_PAD, self.tokenizer.pad_token_id, token_ids)
        return [text.strip() for text in self.tokenizer.batch_decode(token_ids, skip_special_tokens=True)]

    def __call__(self, prediction: EvalPrediction) -> dict[str, float]:
        predictions = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        self.last_predictions = self.decode(predictions)
        if len(self.last_predictions) != len(self.references):
            raise RuntimeError(
                f"{len(self.last_predictions)} predictions for {len(self.references)} references: "
                "the evaluated dataset and the references do not match."
            )
        scores = self.metric.compute(predictions=self.last_predictions, references=self.references)
        lengths = [np.count_nonzero(row != self.tokenizer.pad_token_id) for row in predictions]
        return {**{name: float(value) for name, value in scores.items()}, "gen_len": float(np.mean(lengths))}

    @contextmanager
    def scoring(self, references: list[str]) -> Iterator[None]:
        """Score against ``references`` inside the block (e.g. the test split), then restore."""
        previous, self.references = self.references, references
        try:
            yield
        finally:
            self.references = previous


LOSS_TERMS_PREFIX = "loss_terms/"


class LossTermLogging:
    """Trainer mixin (listed before the ``Trainer`` class in the bases): logs every entry of the
    model output's ``loss_terms`` beside the loss as ``loss_terms/<name>``.

    A term's logged value is its mean over the training micro-batches since the last log, averaged
    over processes, like the loss itself: one term per component lets a run show which part of a
    composite loss (SurfaceFusion's two cross-entropies, E2S2's four objectives) moves.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._loss_term_sums: dict[str, torch.Tensor] = {}
        self._loss_term_counts: dict[str, int] = {}

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        terms = outputs.get("loss_terms") if isinstance(outputs, Mapping) else None
        if model.training:
            for name, value in (terms or {}).items():
                value = value.detach().float()
                running = self._loss_term_sums.get(name)
                self._loss_term_sums[name] = value if running is None else running + value
                self._loss_term_counts[name] = self._loss_term_counts.get(name, 0) + 1
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._loss_term_sums:  # a training log: add what accumulated
            names = sorted(self._loss_term_sums)
            means = torch.stack([self._loss_term_sums[name] / self._loss_term_counts[name] for name in names])
            means = self.accelerator.reduce(means, reduction="mean")  # one collective for all terms
            logs.update({LOSS_TERMS_PREFIX + name: value for name, value in zip(names, means.tolist())})
            self._loss_term_sums, self._loss_term_counts = {}, {}
        super().log(logs, start_time)


class SetEpochCallback(TrainerCallback):
    """Hands the epoch that starts to ``target().set_epoch`` (a batch sampler's shuffle, a
    collator's noise), so an epoch's randomness is a function of (seed, epoch) and resumable.

    The Trainer reaches a sampler's ``set_epoch`` through accelerate's wrappers, except when a
    distributed run resumes mid-epoch (the skipping wrapper hides it), and never a collator's; then
    the batches or the noise would silently differ from the uninterrupted run. The epoch is
    ``floor(state.epoch)``: an integer at an epoch boundary (the 1e-9 absorbs float error there),
    ``e + fraction`` when resuming inside epoch ``e``. ``target`` is a getter because a sampler is
    created with its DataLoader, after the callback; it may return None (nothing to tell yet).
    """

    def __init__(self, target: Callable[[], Any]):
        self.target = target

    def on_epoch_begin(self, args, state, control, **kwargs):
        target = self.target()
        if target is not None:
            target.set_epoch(math.floor((state.epoch or 0.0) + 1e-9))


class FusionSeq2SeqTrainer(LossTermLogging, Seq2SeqTrainer):
    """``Seq2SeqTrainer`` with length-bucketed batches and ``loss_terms`` / tokens-per-second logs.

    ``args`` may carry ``max_tokens_per_batch`` (a :class:`~training.arguments.FusionTrainingArguments`);
    with a plain ``Seq2SeqTrainingArguments`` batches hold ``per_device_train_batch_size`` rows.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.train_batch_sampler: LengthBucketBatchSampler | None = None
        self._real_tokens = torch.zeros((), dtype=torch.float64, device=self.args.device)
        self._window_start: float | None = None
        self.add_callback(SetEpochCallback(lambda: self.train_batch_sampler))

    # --- data -----------------------------------------------------------------------------------
    def get_train_dataloader(self) -> DataLoader:
        if not isinstance(self.train_dataset, TokenizedPairs):
            return super().get_train_dataloader()
        self.train_batch_sampler = LengthBucketBatchSampler(
            self.train_dataset.source_lengths,
            self.train_dataset.target_lengths,
            max_tokens=getattr(self.args, "max_tokens_per_batch", None),
            max_rows=self._train_batch_size,
            seed=self.args.data_seed if self.args.data_seed is not None else self.args.seed,
        )
        loader = DataLoader(
            self.train_dataset,
            batch_sampler=self.train_batch_sampler,
            collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
            persistent_workers=self.args.dataloader_persistent_workers and self.args.dataloader_num_workers > 0,
            prefetch_factor=self.args.dataloader_prefetch_factor,
            worker_init_fn=partial(
                seed_worker, num_workers=self.args.dataloader_num_workers, rank=self.args.process_index
            ),
        )
        # Under DDP accelerate deals the batches round-robin to the processes.
        return self.accelerator.prepare(loader)

    # --- throughput ---------------------------------------------------------------------------
    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if model.training:
            if self._window_start is None:
                self._window_start = time.perf_counter()
            # Summed as a tensor: no device sync per step, one reduction per log.
            real = inputs["attention_mask"].sum()
            if "labels" in inputs:
                real = real + (inputs["labels"] != LABEL_PAD).sum()
            self._real_tokens += real
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._window_start is not None:  # a training log: add the window's rate
            tokens = self.accelerator.reduce(self._real_tokens.clone(), reduction="sum").item()
            elapsed = time.perf_counter() - self._window_start
            if elapsed > 0 and math.isfinite(tokens):
                logs["tokens_per_second"] = round(tokens / elapsed, 1)
            self._real_tokens.zero_()
            self._window_start = time.perf_counter()
        super().log(logs, start_time)

    def evaluation_loop(self, *args: Any, **kwargs: Any):
        # Seq2SeqTrainer gathers predictions with plain ``gather``, which under DDP keeps the
        # examples accelerate repeats to even out the last batch: there are then more predictions
        # than examples. ``gather_for_metrics`` drops the repeats.
        self.gather_function = self.accelerator.gather_for_metrics
        return super().evaluation_loop(*args, **kwargs)

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        metrics = super().evaluate(*args, **kwargs)
        self._window_start = time.perf_counter()  # evaluation time is not training throughput
        return metrics


class TimeBudgetCallback(TrainerCallback):
    """Stops training after ``minutes`` of wall time, evaluating and saving the last state first
    (so best-model selection sees it).

    Every process must stop at the same step, so under DDP the main process decides and the
    decision is broadcast (one tiny collective per step, negligible next to a training step).
    """

    def __init__(self, minutes: float, broadcast: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.seconds = minutes * 60.0
        self.broadcast = broadcast
        self.start: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        over = torch.tensor(float(time.perf_counter() - self.start > self.seconds))
        if self.broadcast is not None:
            over = self.broadcast(over)
        if over.item():
            control.should_training_stop = True
            control.should_save = True
            control.should_evaluate = args.eval_strategy != "no"
        return control
