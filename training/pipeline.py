"""The steps of a run, from raw parallel text to a Hub-ready folder.

``train`` runs each step once, in this order, and resolves each setting once, in the step that
first needs it: data (load the splits) -> tokenizer (train one, or load one) -> tokenize once ->
model config (built once, sized to the tokenizer) and model (or a checkpoint to fine-tune) ->
generation config (once) -> ``FusionSeq2SeqTrainer.train`` (resumable) -> beam-search test
evaluation -> export the final folder with its model card -> optionally push it. Each step is a
function so the CLI, the benchmarks and the tests run the very same code.

Multi-process runs (torchrun / accelerate launch) run this on every process: the steps that
write to disk (corpus build, tokenizer training, tokenization cache) run on the main process
first and the others then read the result; export and push run on the main process only.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import json
import logging
import os
import re
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from transformers import (
    AutoConfig,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    EarlyStoppingCallback,
    GenerationConfig,
    PreTrainedConfig,
    PreTrainedModel,
    TrainerCallback,
    set_seed,
)

import hf_fusion
from hf_fusion.convert import ARCHITECTURES

from .arguments import DataArguments, Experiment, FusionTrainingArguments, ModelArguments
from .batching import PairCollator, TokenizedPairs, tokenize_pairs
from .curves import TrainingCurvesCallback
from .data import load_parallel_data
from .errors import ModelLoadError, OutputDirBusyError, ResumeError, UsageError
from .export import export_model, push_folder
from .metrics import load_translation_metric
from .model_card import card_facts, render_model_card
from .tokenizer import check_tokenizer_fits, config_fields_for, train_tokenizer
from .trainer import FusionSeq2SeqTrainer, TimeBudgetCallback, TranslationMetrics

logger = logging.getLogger(__name__)

TOKENIZER_SUBDIR = "tokenizer"
RESULTS_FILE = "results.json"
LOCK_FILE = ".lock"
# What the run started on (the training data's content hash), checked when it resumes.
RUN_DATA_FILE = "run_data.json"
CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
# The Trainer writes a checkpoint's weights first and trainer_state.json last: a folder with both
# (and a trainer_state.json that parses) is complete.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


# --- the output folder: one run at a time ------------------------------------------------------
@contextlib.contextmanager
def output_dir_lock(output_dir: str | os.PathLike, enabled: bool = True) -> Iterator[None]:
    """Hold an exclusive ``fcntl.flock`` on ``OUTPUT_DIR/.lock`` for the body (the whole run), with
    the holder's pid, host and start time written in it; a second run into the same folder fails at
    once with :class:`OutputDirBusyError` naming the holder. The kernel drops the lock when the
    holder dies (even by ``kill -9``), so a crashed run never leaves the folder locked."""
    if not enabled:
        yield
        return
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    handle = open(folder / LOCK_FILE, "a+", encoding="utf-8")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "holder unknown"
            raise OutputDirBusyError(
                f"{folder} is in use by another run ({holder}); wait for it to finish, or choose another "
                "--output_dir."
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(
            f"pid {os.getpid()} on host {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
        )
        handle.flush()
        try:
            yield
        finally:
            handle.seek(0)
            handle.truncate()
            handle.flush()
            fcntl.flock(handle, fcntl.LOCK_UN)
    finally:
        handle.close()


def train_data_hash(train: datasets.Dataset) -> str:
    """SHA-256 of the training pairs' text, in order (a content hash: independent of the file's
    path, time stamps and the datasets cache)."""
    digest = hashlib.sha256()
    for batch in train.select_columns(["source", "target"]).iter(batch_size=10_000):
        for source, target in zip(batch["source"], batch["target"]):
            digest.update(source.encode("utf-8") + b"\x00" + target.encode("utf-8") + b"\x01")
    return digest.hexdigest()


# --- data ---------------------------------------------------------------------------------------
def load_splits(data_args: DataArguments) -> datasets.DatasetDict:
    """The ``source``/``target`` splits of the run, cut to the ``max_*_samples`` limits."""
    splits = load_parallel_data(
        dataset_name=data_args.dataset,
        dataset_config=data_args.dataset_config_name,
        train_file=data_args.train_file,
        validation_file=data_args.validation_file,
        test_file=data_args.test_file,
        source_lang=data_args.source_lang,
        target_lang=data_args.target_lang,
        cache_dir=data_args.data_cache_dir,
    )
    limits = {
        "train": data_args.max_train_samples,
        "validation": data_args.max_eval_samples,
        "test": data_args.max_test_samples,
    }
    return datasets.DatasetDict(
        {
            name: split.select(range(min(limits[name], len(split)))) if limits.get(name) is not None else split
            for name, split in splits.items()
        }
    )


def _tokenizer_fingerprint(data_args: DataArguments, train: datasets.Dataset) -> str:
    return json.dumps({"train": train_data_hash(train), "vocab_size": data_args.tokenizer_vocab_size})


def load_tokenizer(name_or_path: str, what: str = "tokenizer_name_or_path") -> Any:
    """``AutoTokenizer.from_pretrained`` with a one-line error naming the option and the fix."""
    local = Path(name_or_path).expanduser()
    if local.exists() and not local.is_dir():
        raise ModelLoadError(f"{what}={name_or_path!r} is a file; give the folder that holds tokenizer.json.")
    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as error:
        raise ModelLoadError(
            f"{what}={name_or_path!r} could not be loaded as a tokenizer ({str(error).splitlines()[0]}); give a "
            "folder written by save_pretrained (with tokenizer.json) or a Hub id."
        ) from error


def get_tokenizer(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: FusionTrainingArguments,
    train: datasets.Dataset | None,
    checkpoint: str | None = None,
) -> Any:
    """The run's tokenizer: an existing one (by path), the checkpoint's, or one trained on ``train``.

    A trained tokenizer is saved to ``OUTPUT_DIR/tokenizer`` with the fingerprint of the data it
    was trained on, and reused by the other processes of a distributed run. A resumed run
    (``checkpoint``) never trains one: it uses exactly the tokenizer saved in the checkpoint (else
    ``OUTPUT_DIR/tokenizer``). Its length limit is the model's, set once the model exists
    (:func:`train`).
    """
    if not model_args.trains_tokenizer:
        name = model_args.tokenizer_name_or_path or model_args.model_name_or_path
        what = "tokenizer_name_or_path" if model_args.tokenizer_name_or_path else "model_name_or_path"
        return load_tokenizer(name, what)
    folder = Path(training_args.output_dir) / TOKENIZER_SUBDIR
    if checkpoint is not None:
        for saved in (Path(checkpoint), folder):
            if (saved / "tokenizer.json").is_file():
                logger.info("Resuming with the tokenizer the run started with (%s)", saved)
                return AutoTokenizer.from_pretrained(saved)
        raise ResumeError(
            f"Cannot resume from {checkpoint}: neither it nor {folder} holds the tokenizer the run started with "
            "(tokenizer.json); start a new run in another --output_dir."
        )
    if train is None:
        raise ValueError("A tokenizer can only be trained on a train split; give tokenizer_name_or_path.")
    fingerprint = _tokenizer_fingerprint(data_args, train)
    with training_args.main_process_first(desc="training the tokenizer"):
        stamp = folder / "trained_on.json"
        if stamp.is_file() and stamp.read_text() == fingerprint:
            return AutoTokenizer.from_pretrained(folder)
        texts = (text for column in ("source", "target") for text in train[column])
        tokenizer = train_tokenizer(texts, vocab_size=data_args.tokenizer_vocab_size)
        logger.info("Trained a joint tokenizer of %d tokens on %d training pairs", len(tokenizer), len(train))
        if training_args.process_index == 0:
            tokenizer.save_pretrained(folder)
            stamp.write_text(fingerprint)
        return tokenizer


@dataclass
class EvalSplit:
    """A tokenized evaluation split in length-sorted order, with its raw references.

    ``order[i]`` is the original position of the i-th sorted example, so predictions can be
    written back in the order of the input file.
    """

    dataset: TokenizedPairs
    references: list[str]
    sources: list[str]
    order: np.ndarray

    def in_original_order(self, predictions: Sequence[str]) -> list[str]:
        restored = [""] * len(predictions)
        for sorted_position, original in enumerate(self.order.tolist()):
            restored[original] = predictions[sorted_position]
        return restored


@dataclass
class PreparedData:
    """Everything the Trainer reads, built once."""

    splits: datasets.DatasetDict
    tokenizer: Any
    train: TokenizedPairs | None
    evaluation: dict[str, EvalSplit] = field(default_factory=dict)


def prepare_data(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: FusionTrainingArguments,
    only_split: str | None = None,
    checkpoint: str | None = None,
) -> PreparedData:
    """Load, (train the tokenizer,) tokenize and length-sort every split, or only ``only_split``
    (evaluation of a trained model, whose tokenizer comes with it). A resumed run (``checkpoint``)
    takes the tokenizer it started with."""
    with training_args.main_process_first(desc="building the corpus"):
        splits = load_splits(data_args)
    if only_split is not None:
        if only_split not in splits:
            raise ValueError(f"The data has no {only_split!r} split; splits: {', '.join(splits)}.")
        splits = datasets.DatasetDict({only_split: splits[only_split]})
    tokenizer = get_tokenizer(model_args, data_args, training_args, splits.get("train"), checkpoint)
    with training_args.main_process_first(desc="tokenizing"):
        tokenized = tokenize_pairs(
            splits,
            tokenizer,
            data_args.max_source_length,
            data_args.max_target_length,
            num_proc=data_args.preprocessing_num_workers,
        )
    evaluation = {}
    for name in ("validation", "test"):
        if name not in tokenized:
            continue
        pairs = TokenizedPairs.from_dataset(tokenized[name])
        order = pairs.length_sorted_order()
        evaluation[name] = EvalSplit(
            dataset=pairs.select(order),
            references=[splits[name]["target"][i] for i in order.tolist()],
            sources=[splits[name]["source"][i] for i in order.tolist()],
            order=order,
        )
    train = TokenizedPairs.from_dataset(tokenized["train"]) if "train" in tokenized else None
    return PreparedData(splits, tokenizer, train, evaluation)


# --- model --------------------------------------------------------------------------------------
def build_model(model_args: ModelArguments, tokenizer: Any) -> PreTrainedModel:
    """A fresh model of ``model_type`` sized to the tokenizer, or the checkpoint to fine-tune.

    A fresh model's config is built here, once: the tokenizer's vocabulary size and special ids,
    then the ``model_config`` fields (which win). A BART/mBART/Marian checkpoint is converted to
    ``model_type`` on load; ``model_config`` fields override the checkpoint's config (e.g.
    ``dropout``, ``label_smoothing``).
    """
    fields = dict(model_args.model_config)
    if model_args.model_name_or_path:
        try:
            source_type = AutoConfig.from_pretrained(model_args.model_name_or_path).model_type
        except (OSError, ValueError) as error:
            raise ModelLoadError(
                f"model_name_or_path={model_args.model_name_or_path!r} could not be loaded "
                f"({str(error).splitlines()[0]}); give a folder with config.json or a Hub id NAMESPACE/NAME."
            ) from error
        if source_type in hf_fusion.MODEL_FAMILIES:
            model = AutoModelForSeq2SeqLM.from_pretrained(model_args.model_name_or_path, **fields)
        elif source_type in ARCHITECTURES:
            model = hf_fusion.convert_from_pretrained(model_args.model_name_or_path, model_args.model_type, **fields)
        else:
            raise ValueError(
                f"model_name_or_path={model_args.model_name_or_path!r} is a {source_type!r} model; allowed: an "
                f"hf_fusion checkpoint ({', '.join(hf_fusion.MODEL_FAMILIES)}) or one to convert "
                f"({', '.join(ARCHITECTURES)})."
            )
    else:
        config = AutoConfig.for_model(model_args.model_type, **{**config_fields_for(tokenizer), **fields})
        model = AutoModelForSeq2SeqLM.from_config(config)
    check_tokenizer_fits(tokenizer, model.config)
    return model


# --- training -----------------------------------------------------------------------------------
def checkpoint_folders(output_dir: str | os.PathLike) -> list[Path]:
    """The ``checkpoint-N`` folders of ``output_dir``, newest (highest N) first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [(int(match.group(1)), path) for path in folder.iterdir() if (match := CHECKPOINT_NAME.match(path.name))]
    return [path for _, path in sorted(found, reverse=True) if path.is_dir()]


def checkpoint_problem(folder: Path) -> str | None:
    """Why ``folder`` is not a complete checkpoint (None if it is). The Trainer writes the weights
    first and ``trainer_state.json`` last, so a kill during the save leaves one of them missing."""
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        return "no weights (model.safetensors)"
    state = folder / "trainer_state.json"
    if not state.is_file():
        return "no trainer_state.json"
    try:
        json.loads(state.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        return "a truncated trainer_state.json"
    return None


def last_complete_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of ``output_dir`` (half-written ones are skipped, with a warning)."""
    for folder in checkpoint_folders(output_dir):
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder
        logger.warning("Skipping %s: an incomplete checkpoint (%s), e.g. from a kill during its save", folder, problem)
    return None


def resolve_checkpoint(resume: str | None, output_dir: str) -> str | None:
    """``--resume_from_checkpoint`` as a folder: ``true``/``last`` means the newest *complete*
    checkpoint in OUTPUT_DIR."""
    existing = checkpoint_folders(output_dir)
    if resume is None or str(resume).lower() in ("false", "no", "none", ""):
        if existing:
            raise ResumeError(
                f"{output_dir} already holds checkpoints ({existing[0].name}). Continue that run with "
                "--resume_from_checkpoint true, or choose another --output_dir."
            )
        return None
    if str(resume).lower() in ("true", "last", "yes"):
        last = last_complete_checkpoint(output_dir)
        if last is None:
            if existing:
                raise ResumeError(
                    f"--resume_from_checkpoint true, but no checkpoint in {output_dir} is complete "
                    f"({', '.join(f'{path.name}: {checkpoint_problem(path)}' for path in existing)}); delete them to "
                    "start afresh, or choose another --output_dir."
                )
            raise ResumeError(f"--resume_from_checkpoint true, but {output_dir} holds no checkpoint-* folder.")
        return str(last)
    if not os.path.isdir(resume):
        raise ResumeError(f"--resume_from_checkpoint {resume!r} is not a checkpoint folder.")
    problem = checkpoint_problem(Path(resume))
    if problem is not None:
        raise ResumeError(
            f"--resume_from_checkpoint {resume!r} is an incomplete checkpoint ({problem}); pass "
            "--resume_from_checkpoint true to take the newest complete one."
        )
    return resume


def check_resumed_data(train: datasets.Dataset | None, output_dir: str, checkpoint: str | None, write: bool) -> None:
    """A fresh run records the content hash of its training data (``OUTPUT_DIR/run_data.json``); a
    resumed run must train on the very same pairs, else it fails with :class:`ResumeError`."""
    if train is None:
        return
    record = Path(output_dir) / RUN_DATA_FILE
    current = train_data_hash(train)
    if checkpoint is None:
        if write:
            record.parent.mkdir(parents=True, exist_ok=True)
            record.write_text(json.dumps({"train_sha256": current, "train_pairs": len(train)}) + "\n")
        return
    if not record.is_file():
        logger.warning("%s is missing: cannot check that the resumed run trains on the same data", record)
        return
    started = json.loads(record.read_text())
    if started.get("train_sha256") != current:
        raise ResumeError(
            f"Cannot resume from {checkpoint}: the training data differs from the data this run started with "
            f"({started.get('train_pairs')} pairs then, {len(train)} now; content hash recorded in {record}). "
            "Restore the original data (train_file, max_train_samples), or start a new run in another --output_dir."
        )


def _trainer_args(training_args: FusionTrainingArguments) -> FusionTrainingArguments:
    """The Trainer's copy of the arguments: the Trainer never pushes (we push the exported folder),
    so it holds no Hub token (it pickles its arguments into every checkpoint's
    ``training_args.bin``), and resumption is handled here."""
    return replace(training_args, push_to_hub=False, resume_from_checkpoint=None, hub_token=None)


def _callbacks(training_args: FusionTrainingArguments, title: str) -> list[TrainerCallback]:
    callbacks: list[TrainerCallback] = []
    if training_args.early_stopping_patience is not None:
        callbacks.append(EarlyStoppingCallback(training_args.early_stopping_patience))
    if training_args.max_train_minutes is not None:
        broadcast = None
        if training_args.world_size > 1:
            from accelerate.utils import broadcast as accelerate_broadcast

            broadcast = accelerate_broadcast
        callbacks.append(TimeBudgetCallback(training_args.max_train_minutes, broadcast=broadcast))
    if training_args.plot_training_curves:
        callbacks.append(TrainingCurvesCallback(title))
    return callbacks


def build_trainer(
    experiment: Experiment,
    data: PreparedData,
    model: PreTrainedModel,
    callbacks: Sequence[TrainerCallback] = (),
) -> tuple[FusionSeq2SeqTrainer, TranslationMetrics]:
    """The Trainer of a run, validating on the (length-sorted) validation split if there is one."""
    validation = data.evaluation.get("validation")
    metric = load_translation_metric(keep_in_memory=True)  # no cache files shared between processes
    metrics = TranslationMetrics(data.tokenizer, metric, validation.references if validation else [])
    title = f"{experiment.model.model_type} on {experiment.data.train_file or experiment.data.dataset}"
    trainer = FusionSeq2SeqTrainer(
        model=model,
        args=_trainer_args(experiment.training),
        train_dataset=data.train,
        eval_dataset=validation.dataset if validation else None,
        data_collator=PairCollator(data.tokenizer.pad_token_id),
        processing_class=data.tokenizer,
        compute_metrics=metrics,
        callbacks=[*_callbacks(experiment.training, title), *callbacks],
    )
    return trainer, metrics


def generation_config(model_config: PreTrainedConfig, num_beams: int, max_length: int) -> GenerationConfig:
    """The decoding defaults saved as generation_config.json (what ``generate()`` does unless told
    otherwise): these settings and the model's special ids only, nothing filled in by a library.

    Validated strictly here, as ``save_pretrained`` does after training, so that an invalid
    setting fails before the first step (``early_stopping`` is a beam-search flag, set only for
    ``num_beams > 1``).
    """
    if not isinstance(num_beams, int) or num_beams < 1:
        raise UsageError(f"final_num_beams={num_beams!r} must be a whole number >= 1 (1 = greedy decoding).")
    if max_length < 1:
        raise UsageError(f"generation_max_length={max_length!r} must be >= 1.")
    config = GenerationConfig(
        num_beams=num_beams,
        max_length=max_length,
        **({"early_stopping": True} if num_beams > 1 else {}),
        **{name: getattr(model_config, name) for name in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")},
    )
    try:
        config.validate(strict=True)
    except ValueError as error:
        raise UsageError(f"invalid generation settings: {' '.join(str(error).split())}") from error
    return config


def evaluate_split(
    trainer: FusionSeq2SeqTrainer,
    metrics: TranslationMetrics,
    split: EvalSplit,
    name: str,
    num_beams: int,
    max_length: int,
) -> tuple[dict[str, float], list[str]]:
    """Beam-search ``split``; returns the metrics (prefixed with ``name``) and the predictions in
    the split's original order."""
    with metrics.scoring(split.references):
        output = trainer.predict(split.dataset, metric_key_prefix=name, num_beams=num_beams, max_length=max_length)
        predictions = split.in_original_order(metrics.last_predictions)
    return output.metrics, predictions


@dataclass
class RunResult:
    """What a training run produced."""

    metrics: dict[str, Any]
    export_dir: Path | None
    pushed_revision: str | None = None


def train(
    experiment: Experiment,
    callbacks: Sequence[TrainerCallback] = (),
    model_builder: Callable[[Any], PreTrainedModel] | None = None,
    export: bool = True,
) -> RunResult:
    """Run an experiment end to end (see the module docstring).

    Args:
        experiment: The parsed arguments.
        callbacks: Added to the Trainer's (e.g. to stop a run from a test).
        model_builder: ``tokenizer -> model`` instead of :func:`build_model`, e.g. a baseline
            that is not an hf_fusion family (``benchmarks/main_vs_bart.py``).
        export: Write the Hub-ready folder (needs an hf_fusion model).
    """
    args = experiment.training
    with output_dir_lock(args.output_dir, enabled=args.process_index == 0):
        return _train_locked(experiment, callbacks, model_builder, export)


def check_lengths(data_args: DataArguments, generation_max_length: int, model_config: PreTrainedConfig) -> None:
    """Refuse lengths the model cannot hold (they would fail inside forward, steps into training)."""
    positions = getattr(model_config, "max_position_embeddings", None)
    if positions is None:
        return
    for name, value in (
        ("max_source_length", data_args.max_source_length),
        ("max_target_length", data_args.max_target_length),
        ("generation_max_length", generation_max_length),
    ):
        if value > positions:
            raise UsageError(
                f"{name}={value} exceeds the model's max_position_embeddings={positions}; lower {name} or raise "
                "model_config.max_position_embeddings."
            )


def _train_locked(
    experiment: Experiment,
    callbacks: Sequence[TrainerCallback],
    model_builder: Callable[[Any], PreTrainedModel] | None,
    export: bool,
) -> RunResult:
    args = experiment.training
    set_seed(args.seed)
    checkpoint = resolve_checkpoint(args.resume_from_checkpoint, args.output_dir)
    data = prepare_data(experiment.model, experiment.data, args, checkpoint=checkpoint)
    check_resumed_data(data.splits.get("train"), args.output_dir, checkpoint, write=args.process_index == 0)
    if args.eval_strategy != "no" and "validation" not in data.evaluation:
        raise ValueError(
            f"eval_strategy={args.eval_strategy.value!r} needs a validation split, and the data has only "
            f"{', '.join(data.splits)}: pass --validation_file, or --eval_strategy no "
            "(then also --load_best_model_at_end false)."
        )
    with args.main_process_first(desc="loading the model"):
        model = (model_builder or partial(build_model, experiment.model))(data.tokenizer)
    if experiment.model.trains_tokenizer:
        # A tokenizer trained for this model truncates, by default, where the model's positions end.
        data.tokenizer.model_max_length = model.config.max_position_embeddings
    logger.info(
        "%s model with %s parameters; %d training pairs%s",
        model.config.model_type,
        f"{model.num_parameters():,}",
        len(data.train),
        f"; resuming from {checkpoint}" if checkpoint else "",
    )
    # Everything that can fail after training is checked before its first step.
    check_lengths(experiment.data, experiment.generation_max_length, model.config)
    generation = generation_config(model.config, args.final_num_beams, experiment.generation_max_length)
    # Validation fills every library default into the model's copy; the export saves ``generation``.
    model.generation_config = copy.deepcopy(generation)

    trainer, metrics = build_trainer(experiment, data, model, callbacks)
    train_output = trainer.train(resume_from_checkpoint=checkpoint)
    results: dict[str, Any] = {
        "train_runtime": train_output.metrics.get("train_runtime"),
        "train_steps": trainer.state.global_step,
        "train_loss": train_output.metrics.get("train_loss"),
    }
    validation_logs = [entry for entry in trainer.state.log_history if "eval_bleu" in entry]
    if validation_logs:
        best = max(validation_logs, key=lambda entry: entry["eval_bleu"])
        results["best_validation_bleu"] = best["eval_bleu"]
        results["best_validation_chrf"] = best.get("eval_chrf")

    final_name = "test" if "test" in data.evaluation else ("validation" if "validation" in data.evaluation else None)
    predictions: list[str] = []
    if final_name:
        scores, predictions = evaluate_split(
            trainer, metrics, data.evaluation[final_name], final_name, args.final_num_beams, generation.max_length
        )
        results.update({key: value for key, value in scores.items() if key.endswith(("_bleu", "_chrf", "_gen_len"))})
        results["final_eval_split"] = final_name
        results["final_num_beams"] = args.final_num_beams
        trainer.log_metrics(final_name, scores)

    export_dir, revision = None, None
    if not export and trainer.is_world_process_zero():
        (Path(args.output_dir) / RESULTS_FILE).write_text(json.dumps(results, indent=2) + "\n")
    elif trainer.is_world_process_zero():
        export_dir = Path(args.export_dir)
        output_dir = Path(args.output_dir)
        curves = output_dir / "training_curves.png"
        model = trainer.accelerator.unwrap_model(trainer.model)
        card = render_model_card(
            card_facts(experiment, data.splits, data.tokenizer, model, results, final_name, has_curves=curves.is_file())
        )
        extra = {"experiment.yaml": experiment.to_yaml(), RESULTS_FILE: json.dumps(results, indent=2) + "\n"}
        if predictions:
            extra[f"{final_name}_predictions.txt"] = "\n".join(predictions) + "\n"
        export_model(
            model,
            data.tokenizer,
            export_dir,
            card,
            generation_config=generation,
            extra_files=extra,
            copy_files=[curves] if curves.is_file() else [],
        )
        (output_dir / RESULTS_FILE).write_text(extra[RESULTS_FILE])
        logger.info("Exported the Hub-ready model folder to %s", export_dir)
        if args.push_to_hub:
            if not args.hub_model_id:
                raise ValueError("--push_to_hub needs --hub_model_id NAMESPACE/NAME.")
            revision = push_folder(
                export_dir,
                args.hub_model_id,
                revision=args.hub_revision,
                private=args.hub_private_repo,
                token=args.hub_token,
            )
    trainer.accelerator.wait_for_everyone()
    return RunResult(results, export_dir, revision)


def evaluate_folder(experiment: Experiment, split: str) -> dict[str, Any]:
    """Beam-search one split with the model in ``experiment.model.model_name_or_path``; writes
    ``OUTPUT_DIR/{split}_results.json`` and ``OUTPUT_DIR/{split}_predictions.txt``."""
    args = experiment.training
    data = prepare_data(experiment.model, experiment.data, args, only_split=split)
    model = build_model(experiment.model, data.tokenizer)
    model.generation_config = generation_config(model.config, args.final_num_beams, experiment.generation_max_length)
    trainer, metrics = build_trainer(experiment, data, model)
    scores, predictions = evaluate_split(
        trainer, metrics, data.evaluation[split], split, args.final_num_beams, model.generation_config.max_length
    )
    results = {key: value for key, value in scores.items() if key.endswith(("_bleu", "_chrf", "_gen_len"))}
    results.update(num_beams=args.final_num_beams, num_sentences=len(predictions), model=experiment.model.model_name_or_path)
    output_dir = Path(args.output_dir)
    results_file = output_dir / f"{split}_results.json"
    if trainer.is_world_process_zero():
        results_file.write_text(json.dumps(results, indent=2) + "\n")
        (output_dir / f"{split}_predictions.txt").write_text("\n".join(predictions) + "\n", encoding="utf-8")
    return {**results, "results_file": str(results_file)}


def describe_data(experiment: Experiment) -> str:
    """Build and cache the corpus, tokenizer and tokenized splits; summarise them (for
    ``hf-fusion prepare-data``, e.g. before a multi-process run)."""
    from .batching import LengthBucketBatchSampler, padded_fraction

    args = experiment.training
    data = prepare_data(experiment.model, experiment.data, args)
    lines = [f"Tokenizer: {len(data.tokenizer):,} tokens ({type(data.tokenizer).__name__})"]
    for name, split in data.splits.items():
        pairs = data.train if name == "train" else data.evaluation[name].dataset
        lines.append(
            f"{name:>10}: {len(split):,} pairs, mean {pairs.source_lengths.mean():.1f} source / "
            f"{pairs.target_lengths.mean():.1f} target tokens, longest {int(pairs.source_lengths.max())} / "
            f"{int(pairs.target_lengths.max())}"
        )
    train = data.train
    bucketed = LengthBucketBatchSampler(
        train.source_lengths, train.target_lengths, args.max_tokens_per_batch, args.per_device_train_batch_size, args.seed
    ).batches
    rows = args.per_device_train_batch_size
    shuffled = np.random.default_rng(args.seed).permutation(len(train))
    random_batches = [shuffled[start : start + rows].tolist() for start in range(0, len(train), rows)]
    lines.append(
        f"Training batches: {len(bucketed):,} length-bucketed batches per epoch, "
        f"{padded_fraction(train.source_lengths, train.target_lengths, bucketed):.1%} padding (random batches of {rows}: "
        f"{padded_fraction(train.source_lengths, train.target_lengths, random_batches):.1%})"
    )
    return "\n".join(lines)
