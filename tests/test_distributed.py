"""Multi-process training: ``torchrun`` with 2 CPU processes over gloo (real DDP, not two
processes each training alone)."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli_helpers import CONFIG_DIR, REPO_ROOT, data_overrides, ding_files, requires_ding
from training.batching import LengthBucketBatchSampler, TokenizedPairs, tokenize_pairs
from training.data import load_parallel_data
from training.export import check_export


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
@requires_ding
def test_two_cpu_processes_share_the_batches_and_export_once(tmp_path: Path) -> None:
    run = tmp_path / "run"
    max_steps = 4
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
        "-m", "training.cli", "train", str(CONFIG_DIR / "fusion_transformer_debug.yaml"),
        "--output_dir", str(run), *data_overrides(), "--disable_tqdm", "true",
        "--max_steps", str(max_steps), "--eval_steps", "2", "--save_steps", "2", "--report_to", "none",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    check_export(run / "final")
    results = json.loads((run / "results.json").read_text())
    assert results["train_steps"] == max_steps and "test_bleu" in results
    assert result.stdout.count("Hub-ready model folder") == 1  # the summary comes from rank 0 only

    # Under DDP each process takes every other length-bucketed batch, so an epoch has half the
    # steps of a single-process epoch. Recompute the batches from the run's tokenizer and data.
    from transformers import AutoTokenizer

    from training.arguments import parse_experiment

    experiment = parse_experiment(CONFIG_DIR / "fusion_transformer_debug.yaml")
    tokenizer = AutoTokenizer.from_pretrained(run / "tokenizer")
    splits = load_parallel_data(train_file=ding_files()["train"])
    splits["train"] = splits["train"].select(range(experiment.data.max_train_samples))
    pairs = TokenizedPairs.from_dataset(
        tokenize_pairs(splits, tokenizer, experiment.data.max_source_length, experiment.data.max_target_length)["train"]
    )
    batches = LengthBucketBatchSampler(
        pairs.source_lengths,
        pairs.target_lengths,
        experiment.training.max_tokens_per_batch,
        experiment.training.per_device_train_batch_size,
        seed=experiment.training.seed,
    ).batches
    steps_per_epoch = math.ceil(len(batches) / 2)
    assert steps_per_epoch < len(batches)
    state = json.loads((run / f"checkpoint-{max_steps}" / "trainer_state.json").read_text())
    first = next(entry for entry in state["log_history"] if entry.get("step") == 1 and "loss" in entry)
    assert first["epoch"] == pytest.approx(1 / steps_per_epoch)
