"""Run the cells of a grid, resumably, and record each finished cell.

A cell runs as ``python -m training.cli train CONFIG --overrides...`` in its own folder
``WORK_DIR/cells/<key>-<hash>``: a subprocess, so a cell is exactly what a user's ``hf-fusion
train`` does and a crash or a kill takes only that cell down. What makes the grid cumulative:

- **finished**: the results file holds a record of the cell under its current hash -> skipped;
- **killed**: its folder holds checkpoints but no ``results.json`` -> the train command runs again
  with ``--resume_from_checkpoint true`` (the trainer's own resumption, so the batches and the
  schedule continue exactly);
- **stale**: the record's hash differs (a family default, the grid or the code's defaults
  changed) -> a new folder (the hash is in its name) and a fresh run.

After training, the runner measures what ``hf-fusion train`` does not: the test NLL (teacher
forced, no label smoothing), the parameter count, the FLOPs of one optimizer step (counted by
``torch.utils.flop_counter``) and the learning curves of the run, and writes the cell's record
(one JSON line) into the results file. The test predictions are copied next to it, so the paired bootstrap of the report
needs no work folder.

Several runners may share one work folder (one per free core: each cell trains on one thread):
each takes a cell by an exclusive lock on the cell's folder and skips the cells another runner
holds, and the results file is rewritten under its own lock, so no record is lost.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .grid import (
    Cell,
    Grid,
    cell_hash,
    merged_overrides,
    override_tokens,
    resolved_settings,
    same_run_settings,
    trained_settings,
)

logger = logging.getLogger(__name__)

RESULTS_NAME = "results.jsonl"
PREDICTIONS_DIR = "predictions"
# The log keys a learning curve keeps (train loss, validation loss and BLEU).
CURVE_KEYS = ("loss", "eval_loss", "eval_bleu", "eval_chrf")
# The lock a runner holds on a cell's folder while it runs it (``hf-fusion train`` inside holds
# its own ``.lock`` there, for the training run only).
CELL_LOCK = ".runner.lock"


class CellFailed(RuntimeError):
    """One cell could not run (a failed command, a missing teacher); the grid goes on."""


class GridFailures(RuntimeError):
    """Some cells of a grid failed; the message names each with its log."""


# --- the results file --------------------------------------------------------------------------
def read_results(path: Path) -> dict[str, dict[str, Any]]:
    """The records of a results file by cell key (the last record of a key wins)."""
    records: dict[str, dict[str, Any]] = {}
    if path.is_file():
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    record = json.loads(line)
                except ValueError as error:
                    raise ValueError(f"{path}:{number} is not a JSON line ({error}); fix or delete it.") from error
                records[record["key"]] = record
    return records


@contextlib.contextmanager
def file_lock(path: Path, wait: bool = True) -> Iterator[bool]:
    """Hold an exclusive ``fcntl.flock`` on ``path`` for the body and yield True; with ``wait``
    off, yield False at once (holding nothing) when another process has it. The kernel drops the
    lock when its holder dies, even by ``kill -9``, so a killed runner never leaves a cell or the
    results file locked."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def results_lock(path: Path) -> contextlib.AbstractContextManager[bool]:
    """The lock under which a results file is read, changed and rewritten: two runners recording at
    the same moment would otherwise each rewrite the file without the other's record."""
    return file_lock(path.with_name(path.name + ".lock"))


def _rewrite_results(path: Path, records: dict[str, dict[str, Any]]) -> None:
    """Rewrite the results file atomically (a kill never leaves half a line), sorted by key so its
    diffs stay small; the caller holds :func:`results_lock`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    temporary.write_text("".join(json.dumps(records[key], sort_keys=True) + "\n" for key in sorted(records)))
    temporary.replace(path)


def write_record(path: Path, record: dict[str, Any]) -> None:
    """Replace the record of ``record['key']`` (or add it)."""
    with results_lock(path):
        records = read_results(path)
        records[record["key"]] = record
        _rewrite_results(path, records)


# --- one cell ----------------------------------------------------------------------------------
def cell_dir(work_dir: Path, cell: Cell, digest: str) -> Path:
    return work_dir / "cells" / f"{cell.slug}-{digest[:12]}"


def _train_command(grid: Grid, cell: Cell, run_dir: Path, extra: list[str]) -> list[str]:
    overrides = merged_overrides(grid, cell)
    return [
        sys.executable, "-m", "training.cli", "train", str(grid.config),
        *override_tokens(overrides), "--output_dir", str(run_dir), *extra,
    ]


def _run(command: list[str], log: Path) -> None:
    """Run ``command`` with its output appended to ``log``; a failure names the log."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a", encoding="utf-8") as handle:
        handle.write(f"\n$ {' '.join(command)}\n")
        handle.flush()
        status = subprocess.call(command, stdout=handle, stderr=subprocess.STDOUT, cwd=Path(__file__).parents[2])
    if status != 0:
        raise CellFailed(f"`{' '.join(command[:5])} ...` failed with status {status}; see {log}.")


def _write_pairs(path: Path, sources: list[str], targets: list[str]) -> None:
    """A jsonl file of ``source``/``target`` pairs, written atomically (a kill leaves no half file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(
        "".join(json.dumps({"source": s, "target": t}, ensure_ascii=False) + "\n" for s, t in zip(sources, targets)),
        encoding="utf-8",
    )
    temporary.replace(path)


def _export_split(corpus: str, split: str, path: Path) -> None:
    """Write a split of a built-in corpus as a jsonl file (once)."""
    from ..data import load_parallel_data

    if not path.is_file():
        data = load_parallel_data(dataset_name=corpus)[split]
        _write_pairs(path, data["source"], data["target"])


def _distilled_data(grid: Grid, cell: Cell, teacher_final: Path, run_dir: Path, work_dir: Path) -> list[str]:
    """Sequence-level KD (Kim & Rush): the training sources translated by the teacher, written as
    the student's ``train_file`` in its run folder (whose name holds the hash, hence the teacher's);
    validation and test are the corpus's own, unchanged. The translations are cached by
    ``training.distill`` under ``WORK_DIR/distill`` (keyed by the teacher's weights), so a killed
    distillation resumes and students of the same teacher share them."""
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from ..arguments import parse_experiment
    from ..distill import sequence_level_kd_targets

    experiment = parse_experiment(grid.config, override_tokens(merged_overrides(grid, cell)))
    data_args = experiment.data
    folder = run_dir / "distilled"
    train_file = folder / "train.jsonl"
    if not train_file.is_file():
        from ..data import load_parallel_data

        train = load_parallel_data(dataset_name=cell.corpus)["train"]
        if data_args.max_train_samples is not None:
            train = train.select(range(min(data_args.max_train_samples, len(train))))
        teacher = AutoModelForSeq2SeqLM.from_pretrained(teacher_final).eval()
        tokenizer = AutoTokenizer.from_pretrained(teacher_final)
        recipe = cell.variant.distill or {}
        with torch.inference_mode():
            targets = sequence_level_kd_targets(
                teacher, tokenizer, train["source"], work_dir / "distill" / "cache",
                batch_size=int(recipe.get("batch_size", 64)), max_source_length=data_args.max_source_length,
                generation_kwargs={"num_beams": int(recipe.get("num_beams", 5)),
                                   "max_new_tokens": data_args.max_target_length},
                show_progress=False,
            )
        _write_pairs(train_file, train["source"], targets)
    files = {"validation": folder / "validation.jsonl", "test": folder / "test.jsonl"}
    _export_split(cell.corpus, "validation", files["validation"])
    _export_split(cell.corpus, "test", files["test"])
    return [
        "--train_file", str(train_file), "--validation_file", str(files["validation"]),
        "--test_file", str(files["test"]),
        # The student keeps the teacher's tokenizer (one vocabulary across the comparison).
        *([] if cell.variant.transfer else ["--tokenizer_name_or_path", str(teacher_final)]),
    ]


def _teacher_extra(grid: Grid, cell: Cell, run_dir: Path, work_dir: Path, teacher_final: Path) -> list[str]:
    """The extra train options of a cell that starts from a teacher: the transferred student as
    ``model_name_or_path`` (built once per cell) and/or the distilled training file."""
    extra: list[str] = []
    if cell.variant.transfer:
        init = run_dir / "transferred"
        if not (init / "config.json").is_file():
            config = merged_overrides(grid, cell).get("model_config", {})
            sharing_fields = ("sharing_strategy", "encoder_unique_layers", "decoder_unique_layers")
            sharing = {name: config[name] for name in sharing_fields if name in config}
            partial = run_dir / "transferred.partial"  # renamed when complete: a kill leaves no half model
            shutil.rmtree(partial, ignore_errors=True)
            command = [
                sys.executable, "-m", "training.cli", "transfer", str(teacher_final), str(partial),
                "--model_type", cell.variant.model_type,
                *(token for name, value in sharing.items() for token in (f"--{name}", str(value))),
                "--block_source", json.dumps(cell.variant.transfer.get("block_source", "mean")),
            ]
            _run(command, run_dir / "train.log")
            partial.rename(init)
        extra += ["--model_name_or_path", str(init)]
    if cell.variant.distill:
        extra += _distilled_data(grid, cell, teacher_final, run_dir, work_dir)
    return extra


def _pretrained_model(grid: Grid, cell: Cell, run_dir: Path) -> list[str]:
    """Pretrain the cell's model on its training text (sources and targets, one per line) with
    ``hf-fusion pretrain-e2s2``, then fine-tune it as the cell. The tokenizer is the one the cell
    would train anyway (the pipeline's own ``get_tokenizer``, saved in ``RUN_DIR/tokenizer``), so a
    pretrained variant differs from the others only by its initial weights. Pretraining writes to a
    ``.partial`` folder renamed when done: a killed pretraining starts over, a finished one is kept."""
    from ..arguments import parse_experiment
    from ..pipeline import TOKENIZER_SUBDIR, get_tokenizer, load_splits

    final = run_dir / "pretrained"
    if not (final / "config.json").is_file():
        experiment = parse_experiment(
            grid.config, [*override_tokens(merged_overrides(grid, cell)), "--output_dir", str(run_dir)]
        )
        train = load_splits(experiment.data)["train"]
        get_tokenizer(experiment.model, experiment.data, experiment.training, train)
        text = run_dir / "pretrain_text.txt"
        text.write_text("".join(line + "\n" for column in ("source", "target") for line in train[column]), encoding="utf-8")
        recipe = cell.variant.pretrain or {}
        partial = run_dir / "pretrained.partial"
        shutil.rmtree(partial, ignore_errors=True)
        command = [
            sys.executable, "-m", "training.cli", "pretrain-e2s2", "--model", cell.variant.model_type,
            "--tokenizer", str(run_dir / TOKENIZER_SUBDIR), "--train_files", str(text), "--output_dir", str(partial),
            "--objective", recipe["objective"], "--max_steps", str(recipe["max_steps"]), "--seed", str(cell.seed),
            "--max_length", str(experiment.data.max_source_length),
            "--per_device_train_batch_size", str(recipe.get("batch_size", 64)),
            "--learning_rate", str(recipe.get("learning_rate", experiment.training.learning_rate)),
            "--warmup_steps", str(max(1, recipe["max_steps"] // 10)),
            "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true",
            "--use_cpu", str(experiment.training.use_cpu).lower(),
            *override_tokens({"model_config": experiment.model.model_config}),
        ]
        _run(command, run_dir / "train.log")
        partial.rename(final)
    return ["--model_name_or_path", str(final)]


def finished_dir(work_dir: Path, results_dir: Path, cell: Cell, digest: str) -> Path:
    """The folder a cell was trained in: its record's ``run_dir`` when it is recorded under
    ``digest`` (a re-keyed cell stays in the folder named by its old hash), else its own folder."""
    record = read_results(results_dir / RESULTS_NAME).get(cell.key)
    if record is not None and record.get("hash") == digest and record.get("run_dir"):
        return Path(record["run_dir"])
    return cell_dir(work_dir, cell, digest)


def run_cell(grid: Grid, cell: Cell, digest: str, work_dir: Path, results_dir: Path,
             hashes: dict[str, str]) -> dict[str, Any]:
    """Train (or resume) one cell, measure it, record it; returns its record."""
    from ..pipeline import RESULTS_FILE, checkpoint_folders

    run_dir = cell_dir(work_dir, cell, digest)
    run_dir.mkdir(parents=True, exist_ok=True)
    extra: list[str] = []
    if cell.variant.teacher:
        teacher = grid.cell(cell.variant.teacher, cell.seed, cell.corpus, cell.budget)
        teacher_final = finished_dir(work_dir, results_dir, teacher, hashes[teacher.key]) / "final"
        if not (teacher_final / "config.json").is_file():
            raise CellFailed(f"{cell.key} needs its teacher {teacher.key}, which has not finished ({teacher_final}).")
        extra += _teacher_extra(grid, cell, run_dir, work_dir, teacher_final)
    if cell.variant.pretrain:
        extra += _pretrained_model(grid, cell, run_dir)
    wall_file = run_dir / "wall_seconds.json"
    wall = json.loads(wall_file.read_text())["seconds"] if wall_file.is_file() else 0.0
    if not (run_dir / RESULTS_FILE).is_file():
        resume = ["--resume_from_checkpoint", "true"] if checkpoint_folders(run_dir) else []
        logger.info("%s %s in %s", "Resuming" if resume else "Running", cell.key, run_dir)
        start = time.perf_counter()
        try:
            _run(_train_command(grid, cell, run_dir, extra + resume), run_dir / "train.log")
        finally:
            wall += time.perf_counter() - start
            wall_file.write_text(json.dumps({"seconds": wall}) + "\n")
    record = measure_cell(grid, cell, digest, run_dir, results_dir)
    record["cell_wall_seconds"] = round(wall, 1)
    write_record(results_dir / RESULTS_NAME, record)
    if cell.variant.name not in grid.keep_checkpoints:
        # The exported model (final/) stays; the optimizer states of finished cells are dead weight.
        for folder in checkpoint_folders(run_dir):
            shutil.rmtree(folder)
    return record


def measure_cell(grid: Grid, cell: Cell, digest: str, run_dir: Path, results_dir: Path) -> dict[str, Any]:
    """The record of a trained cell: its scores, test NLL, size, compute and curves."""
    from ..pipeline import RESULTS_FILE, checkpoint_folders
    from .measure import measure_model

    results = json.loads((run_dir / RESULTS_FILE).read_text())
    final = run_dir / "final"
    predictions = (final / "test_predictions.txt").read_text(encoding="utf-8").splitlines()
    target = results_dir / PREDICTIONS_DIR / f"{cell.slug}.txt"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("".join(line + "\n" for line in predictions), encoding="utf-8")
    measured = measure_model(final, cell.corpus, measurement_settings(grid, cell))
    per_step = measured["flops_per_step"]
    states = [folder / "trainer_state.json" for folder in checkpoint_folders(run_dir)]
    history = json.loads(states[0].read_text())["log_history"] if states and states[0].is_file() else []
    curves = [
        {"step": entry["step"], **{key: entry[key] for key in CURVE_KEYS if key in entry}}
        for entry in history
        if "step" in entry and any(key in entry for key in CURVE_KEYS)
    ]
    steps = int(results["train_steps"])
    return {
        "key": cell.key, "variant": cell.variant.name, "seed": cell.seed, "corpus": cell.corpus,
        "budget": cell.budget.name, "hash": digest, "model_type": cell.variant.model_type,
        "bleu": results["test_bleu"], "chrf": results["test_chrf"], "nll": measured["nll"],
        "best_validation_bleu": results.get("best_validation_bleu"),
        "parameters": measured["parameters"], "steps": steps, "flops_per_step": per_step, "flops": per_step * steps,
        "pretrain_steps": (cell.variant.pretrain or {}).get("max_steps", 0),
        "train_seconds": results.get("train_runtime"), "num_beams": results.get("final_num_beams"),
        "test_sentences": len(predictions), "predictions": f"{PREDICTIONS_DIR}/{cell.slug}.txt",
        "curves": curves, "run_dir": str(run_dir), "torch_threads": int(os.environ.get("OMP_NUM_THREADS", "0") or 0),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def measurement_settings(grid: Grid, cell: Cell) -> dict[str, Any]:
    """The cell's length limits and batch shape, as its training run resolved them."""
    from ..arguments import parse_experiment

    experiment = parse_experiment(grid.config, override_tokens(merged_overrides(grid, cell)))
    return {
        "max_test_samples": experiment.data.max_test_samples,
        "max_source_length": experiment.data.max_source_length,
        "max_target_length": experiment.data.max_target_length,
        "max_tokens_per_batch": experiment.training.max_tokens_per_batch,
        "per_device_train_batch_size": experiment.training.per_device_train_batch_size,
    }


# --- the grid ----------------------------------------------------------------------------------
def cell_states(grid: Grid, results_dir: Path, work_dir: Path) -> list[tuple[Cell, str, str]]:
    """Each cell with its hash and state: ``done``, ``stale`` (recorded under another hash),
    ``partial`` (a folder with checkpoints) or ``todo``."""
    from ..pipeline import checkpoint_folders

    records = read_results(results_dir / RESULTS_NAME)
    memo: dict[str, str] = {}
    states = []
    for cell in grid.cells():
        digest = cell_hash(grid, cell, memo)
        record = records.get(cell.key)
        if record is not None and record.get("hash") == digest:
            state = "done"
        elif checkpoint_folders(cell_dir(work_dir, cell, digest)):
            state = "partial"
        else:
            state = "stale" if record is not None else "todo"
        states.append((cell, digest, state))
    return states


def rekey_equivalent(grid: Grid, results_dir: Path) -> list[str]:
    """Give a recorded cell whose hash no longer matches its current hash when the run it records
    was trained with exactly the settings the cell asks for now, read back from the run folder
    (:func:`trained_settings`; its config through the current config classes, which load the
    values a field added later had before it existed). A change of how the hash is computed, or a
    new config field whose default reproduces the old behaviour, then costs no re-run; a real
    change (a default that changes training) still leaves the cell stale. Returns the re-keyed
    cell keys; each record keeps its old hash under ``rekeyed_from``."""
    path = results_dir / RESULTS_NAME
    memo: dict[str, str] = {}
    rekeyed = []
    with results_lock(path):
        records = read_results(path)
        for cell in grid.cells():
            record = records.get(cell.key)
            digest = cell_hash(grid, cell, memo)
            if record is None or record.get("hash") == digest or cell.variant.teacher or cell.variant.pretrain:
                continue  # students and pretrained cells also depend on another run: re-run them
            recorded = trained_settings(Path(record["run_dir"]))
            if recorded is not None and same_run_settings(recorded, resolved_settings(grid, cell)):
                records[cell.key] = {**record, "hash": digest, "rekeyed_from": record["hash"]}
                rekeyed.append(cell.key)
        if rekeyed:
            _rewrite_results(path, records)
    return rekeyed


def run_grid(grid: Grid, work_dir: Path, results_dir: Path, max_cells: int | None = None,
             only: list[str] | None = None, after_cell: Callable[[], Any] | None = None) -> list[dict[str, Any]]:
    """Run every cell that is not done (``only``: of these variants; ``max_cells``: at most that
    many), in the grid's order; returns the records written. ``after_cell`` runs after each
    recorded cell (the report); its failure is logged, never fatal to the grid.

    A cell another runner holds is skipped; one it finished after this runner read the states is
    found recorded once its lock is taken, and skipped too. A cell that fails (its training exits
    non-zero, its teacher is missing) is logged and skipped, so that one broken variant does not
    hold up a grid that runs for days; the grid then ends with :class:`GridFailures` naming every
    failed cell and its log.
    """
    states = cell_states(grid, results_dir, work_dir)
    hashes = {cell.key: digest for cell, digest, _ in states}
    written: list[dict[str, Any]] = []
    failures: list[str] = []
    for cell, digest, state in states:
        if state == "done" or (only and cell.variant.name not in only):
            continue
        if max_cells is not None and len(written) + len(failures) >= max_cells:
            break
        with file_lock(cell_dir(work_dir, cell, digest) / CELL_LOCK, wait=False) as mine:
            if not mine:
                logger.info("%s is being run by another runner: skipped", cell.key)
                continue
            if read_results(results_dir / RESULTS_NAME).get(cell.key, {}).get("hash") == digest:
                continue  # another runner finished it meanwhile
            if state == "stale":
                logger.info("%s is stale (its settings changed since it was recorded): running it again", cell.key)
            try:
                written.append(run_cell(grid, cell, digest, work_dir, results_dir, hashes))
            except CellFailed as error:
                logger.error("%s failed, going on with the next cell: %s", cell.key, error)
                failures.append(f"{cell.key}: {error}")
                continue
        logger.info("Recorded %s: BLEU %.2f", cell.key, written[-1]["bleu"])
        if after_cell is not None:
            try:
                after_cell()
            except Exception:  # a report bug must not stop a long grid
                logger.exception("Writing the report after %s failed; the grid goes on", cell.key)
    if failures:
        raise GridFailures(f"{len(failures)} cell(s) failed (the others were recorded): " + " | ".join(failures))
    return written
