"""Faults and hostile-but-realistic input: what ``hf-fusion`` guarantees (docs/guarantees.md).

Each test pins one guarantee so that a later change cannot quietly undo it: credentials are never
written anywhere, the library never changes the system's packages, a half-written checkpoint does
not strand a run, one output folder holds one run, generation and length settings fail before the
first step, and every malformed data file gets one line naming the file, the line and the fix.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.cli_helpers import CONFIG_DIR, REPO_ROOT, RecordingHub, data_overrides, ding_files, requires_ding
from tests.test_cli import _train_in_subprocess
from training.arguments import parse_experiment
from training.cli import main
from training.errors import (
    EXIT_BUSY,
    EXIT_DATA,
    EXIT_FILESYSTEM,
    EXIT_INTERRUPTED,
    EXIT_MODEL,
    EXIT_RESUME,
    EXIT_USAGE,
)

DEBUG_CONFIG = CONFIG_DIR / "fusion_transformer_debug.yaml"
QUIET = ["--disable_tqdm", "true"]
PLANTED = "hf_PLANTEDsecretTOKEN0123456789abcdef"


def _one_error_line(stderr: str, command: str = "train") -> str:
    lines = [line for line in stderr.splitlines() if line.startswith(f"hf-fusion {command}: error:")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


# --- 1. credentials ------------------------------------------------------------------------------
def test_a_hub_token_is_used_but_never_recorded(tmp_path: Path) -> None:
    from training.pipeline import _trainer_args

    config = tmp_path / "experiment.yaml"
    config.write_text(DEBUG_CONFIG.read_text().replace("extends: base.yaml", f"extends: {CONFIG_DIR / 'base.yaml'}")
                      + f"hub_token: {PLANTED}\n")
    experiment = parse_experiment(config, ["--hub_token", PLANTED, "--output_dir", str(tmp_path / "run")])
    assert experiment.training.hub_token == PLANTED  # the run can still push with it
    assert PLANTED not in experiment.to_yaml() and "hub_token" not in experiment.settings
    assert _trainer_args(experiment.training).hub_token is None  # pickled into every checkpoint


# --- 2. the library never changes the system's packages -----------------------------------------
def test_a_missing_corpus_package_names_the_command_and_runs_no_apt_update(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from training import corpora
    from training.errors import SetupError

    commands: list[list[str]] = []

    def fake_run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
        commands.append(command)
        return subprocess.CompletedProcess(command, 100, "", "E: Unable to locate package trans-de-en")

    monkeypatch.setattr(corpora, "_run", fake_run)
    monkeypatch.setattr(corpora, "_installed", lambda path: False)
    monkeypatch.setattr(corpora.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(os, "geteuid", lambda: 0)  # even as root
    with pytest.raises(SetupError, match=r"sudo apt-get update && sudo apt-get install -y trans-de-en"):
        corpora.fetch_debian_package("trans-de-en", "usr/share/trans/de-en", tmp_path)
    assert commands == [["apt-get", "download", "trans-de-en"]]


def _scan_for_secret(root: Path) -> list[str]:
    """Every file under ``root`` (checkpoints, tensorboard events, exports, evaluations) holding
    the planted token, as raw bytes: pickles and event files included."""
    return [str(path) for path in root.rglob("*") if path.is_file() and PLANTED.encode() in path.read_bytes()]


@pytest.mark.slow
@requires_ding
def test_a_planted_token_reaches_no_file_log_card_or_upload(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    import transformers

    hub = RecordingHub()
    monkeypatch.setattr(transformers.utils.hub, "_hf_api", hub)
    run = tmp_path / "run"
    with caplog.at_level("DEBUG"):
        assert main(["train", str(DEBUG_CONFIG), "--output_dir", str(run), *data_overrides(), *QUIET,
                     "--hub_token", PLANTED, "--push_to_hub", "--hub_model_id", "org/model"]) == 0  # fmt: skip
        assert main(["evaluate", str(run / "final"), "--output_dir", str(tmp_path / "evaluation"), *QUIET]) == 0
        assert main(["push", str(run / "final"), "--repo_id", "org/again", "--token", PLANTED]) == 0
    assert (run / "final" / "experiment.yaml").is_file() and list((run / "runs").rglob("events.*"))
    assert _scan_for_secret(tmp_path) == []
    uploaded = [name for _, _, files in hub.commits for name, data in files.items() if PLANTED.encode() in data]
    assert uploaded == [] and len(hub.commits) == 4
    printed = capsys.readouterr()
    assert PLANTED not in printed.out + printed.err and PLANTED not in caplog.text


# --- 3. a kill during a checkpoint save ---------------------------------------------------------
@pytest.mark.slow
@requires_ding
def test_resume_skips_a_half_written_checkpoint_and_matches_the_uninterrupted_run(tmp_path: Path) -> None:
    options = [
        *data_overrides(), *QUIET, "--max_train_samples", "64", "--max_tokens_per_batch", "768",
        "--max_steps", "8", "--save_steps", "4", "--eval_strategy", "no", "--load_best_model_at_end", "false",
        "--report_to", "none", "--plot_training_curves", "false",
    ]  # fmt: skip
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    assert _train_in_subprocess(["--output_dir", str(straight), *options]).returncode == 0
    options += ["--tokenizer_name_or_path", str(straight / "tokenizer")]
    killed = _train_in_subprocess(["--output_dir", str(interrupted), *options], kill_after_step=4)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    # The kill came during the save of step 6: weights half there, trainer_state.json never written.
    half = interrupted / "checkpoint-6"
    shutil.copytree(interrupted / "checkpoint-4", half)
    (half / "trainer_state.json").unlink()
    (half / "model.safetensors").write_bytes((half / "model.safetensors").read_bytes()[:100])
    fresh = _train_in_subprocess(["--output_dir", str(interrupted), *options])
    assert fresh.returncode != 0 and "--resume_from_checkpoint true" in fresh.stderr
    resumed = _train_in_subprocess(["--output_dir", str(interrupted), *options, "--resume_from_checkpoint", "true"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "Skipping" in resumed.stderr and "checkpoint-6" in resumed.stderr
    weights = load_file(straight / "final" / "model.safetensors")
    after = load_file(interrupted / "final" / "model.safetensors")
    assert weights.keys() == after.keys()
    for name, tensor in weights.items():
        assert torch.equal(after[name], tensor), name


def test_resume_true_names_the_incomplete_checkpoints_when_none_is_complete(tmp_path: Path) -> None:
    from training.errors import ResumeError
    from training.pipeline import resolve_checkpoint

    (tmp_path / "checkpoint-3").mkdir()
    (tmp_path / "checkpoint-3" / "model.safetensors").write_bytes(b"x")
    (tmp_path / "checkpoint-3" / "trainer_state.json").write_text('{"global_step": ')  # truncated
    with pytest.raises(ResumeError, match=r"checkpoint-3: a truncated trainer_state.json.*delete them"):
        resolve_checkpoint("true", str(tmp_path))
    with pytest.raises(ResumeError, match="incomplete checkpoint"):
        resolve_checkpoint(str(tmp_path / "checkpoint-3"), str(tmp_path))


# --- 4. the tokenizer of a resumed run, and of a rerun -------------------------------------------
def test_a_resumed_run_uses_the_tokenizer_in_its_checkpoint(tmp_path: Path) -> None:
    from training.pipeline import get_tokenizer
    from training.tokenizer import train_tokenizer

    experiment = parse_experiment(DEBUG_CONFIG, ["--output_dir", str(tmp_path), "--train_file", "x.jsonl"])
    started = train_tokenizer(["The cat sat on the mat.", "Die Katze saß auf der Matte."] * 5, vocab_size=40)
    other = train_tokenizer(["Completely different words here."] * 5, vocab_size=30)
    started.save_pretrained(tmp_path / "checkpoint-4")
    other.save_pretrained(tmp_path / "tokenizer")
    (tmp_path / "tokenizer" / "trained_on.json").write_text("stale")
    before = (tmp_path / "tokenizer" / "tokenizer.json").read_bytes()
    tokenizer = get_tokenizer(experiment.model, experiment.data, experiment.training, None, str(tmp_path / "checkpoint-4"))
    assert tokenizer.get_vocab() == started.get_vocab()
    assert (tmp_path / "tokenizer" / "tokenizer.json").read_bytes() == before  # nothing retrained or overwritten


TRAIN_TOKENIZER = """
import json, sys
from training.tokenizer import train_tokenizer
rows = [json.loads(line) for line in open(sys.argv[1], encoding="utf-8")]
tokenizer = train_tokenizer([r["source"] for r in rows] + [r["target"] for r in rows], vocab_size=400)
print(json.dumps(tokenizer.get_vocab(), sort_keys=True))
"""


@pytest.mark.slow
@requires_ding
def test_two_tokenizer_trainings_on_the_same_text_give_the_same_ids() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    vocabularies = [
        subprocess.run([sys.executable, "-c", TRAIN_TOKENIZER, str(ding_files()["train"])], cwd=REPO_ROOT, env=env,
                       capture_output=True, text=True, check=True).stdout  # fmt: skip
        for _ in range(3)
    ]
    assert vocabularies[0] == vocabularies[1] == vocabularies[2]


# --- 5. one run per output folder ----------------------------------------------------------------
def test_a_second_run_into_a_locked_folder_is_one_line_naming_the_holder(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    import fcntl

    run = tmp_path / "run"
    run.mkdir()
    with open(run / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("pid 4242 on host elsewhere since 2024-01-01 00:00:00\n")
        held.flush()
        status = main(["train", str(DEBUG_CONFIG), "--output_dir", str(run), *QUIET, "--train_file", "x.jsonl"])
    line = _one_error_line(capsys.readouterr().err)
    assert status == EXIT_BUSY and "pid 4242 on host elsewhere" in line and "another --output_dir" in line
    assert not (run / "tokenizer").exists()  # refused before any work


# --- resume with changed data ---------------------------------------------------------------------
@requires_ding
def test_resuming_on_changed_data_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from training.tokenizer import train_tokenizer

    run = tmp_path / "run"
    checkpoint = run / "checkpoint-3"
    train_tokenizer(["The cat sat on the mat.", "Die Katze saß auf der Matte."] * 5, vocab_size=60).save_pretrained(checkpoint)
    (checkpoint / "model.safetensors").write_bytes(b"weights")
    (checkpoint / "trainer_state.json").write_text("{}")
    (run / "run_data.json").write_text(json.dumps({"train_sha256": "0" * 64, "train_pairs": 300}))
    status = main(["train", str(DEBUG_CONFIG), "--output_dir", str(run), *data_overrides(), *QUIET,
                   "--resume_from_checkpoint", "true"])  # fmt: skip
    line = _one_error_line(capsys.readouterr().err)
    assert status == EXIT_RESUME and "training data differs" in line and "300 pairs then, 256 now" in line


# --- 6, 7. settings that would fail after training are refused before it -------------------------
def test_greedy_final_decoding_is_a_valid_generation_config(tmp_path: Path) -> None:
    from hf_fusion import FusionTransformerConfig
    from training.pipeline import generation_config

    generation_config(FusionTransformerConfig(vocab_size=50), num_beams=1, max_length=20).save_pretrained(tmp_path)
    assert "early_stopping" not in json.loads((tmp_path / "generation_config.json").read_text())


@requires_ding
@pytest.mark.parametrize(
    "options, status, expected",
    [
        (["--final_num_beams", "0"], EXIT_USAGE, "final_num_beams=0 must be a whole number >= 1"),
        (["--max_source_length", "200"], EXIT_USAGE, "max_source_length=200 exceeds the model's max_position_embeddings=128"),
        (["--model_name_or_path", "/no/such/model"], EXIT_MODEL, "model_name_or_path='/no/such/model' does not exist"),
        (["--tokenizer_name_or_path", "./no_tokenizer"], EXIT_MODEL, "tokenizer_name_or_path='./no_tokenizer' does not exist"),
    ],
    ids=["beams", "source_length", "model_path", "tokenizer_path"],
)
def test_settings_are_checked_before_the_first_step(
    options: list[str], status: int, expected: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run = tmp_path / "run"
    assert main(["train", str(DEBUG_CONFIG), "--output_dir", str(run), *data_overrides(), *QUIET, *options]) == status
    assert expected in _one_error_line(capsys.readouterr().err)
    assert not list(run.glob("checkpoint-*"))


# --- 11. malformed data files: one line naming the file, the line and the fix -------------------
GOOD_JSONL = '{"source": "Hello there.", "target": "Hallo."}\n'
MALFORMED = {
    "not_utf8": (".jsonl", GOOD_JSONL.encode() * 3 + b'{"source": "caf\xe9", "target": "x"}\n',
                 "line 4: byte 0xe9 at column 16 is not UTF-8; re-save it as UTF-8"),
    "not_utf8_after_64k": (".jsonl", GOOD_JSONL.encode() * 2000 + b'{"source": "\xff", "target": "x"}\n',
                           "line 2001: byte 0xff at column 13 is not UTF-8"),
    "tsv_third_field": (".tsv", b"source\ttarget\nHello.\tHallo.\nOne.\tEins.\tExtra\n",
                        "line 3 has 3 tab-separated fields but the header has 2: remove the extra tab"),
    "truncated_json": (".jsonl", GOOD_JSONL.encode() + b'{"source": "Hello", "tar\n',
                       "line 2 is not valid JSON (Unterminated string"),
    "duplicate_key": (".jsonl", GOOD_JSONL.encode() + b'{"source": "a", "source": "b", "target": "c"}\n',
                      "line 2 has the key 'source' twice; keep one of them"),
    "not_an_object": (".jsonl", GOOD_JSONL.encode() + b'"just a string"\n', "line 2 is not a JSON object"),
    "csv_extra_field": (".csv", b"source,target\nHello.,Hallo.\n\"One, two\",Eins,drei\n",
                        "line 3 has 3 comma-separated fields but the header has 2"),
    "empty": (".jsonl", b"\n  \n", "is empty"),
    "directory": (".jsonl", None, "is a directory; give one .jsonl file inside it"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_data_file_is_one_line_naming_file_line_and_fix(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    suffix, content, expected = MALFORMED[case]
    path = tmp_path / f"train{suffix}"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    status = main(["train", str(DEBUG_CONFIG), "--output_dir", str(tmp_path / "run"), *QUIET,
                   "--train_file", str(path), "--eval_strategy", "no", "--load_best_model_at_end", "false"])  # fmt: skip
    line = _one_error_line(capsys.readouterr().err)
    assert status == EXIT_DATA and f"train_file={str(path)!r}" in line and expected in line, line


# --- 12. a tokenizer that is not the model's -----------------------------------------------------
def test_a_smaller_tokenizer_than_the_models_embedding_is_refused() -> None:
    from hf_fusion import FusionTransformerConfig
    from training.errors import ModelLoadError
    from training.tokenizer import check_tokenizer_fits, train_tokenizer

    tokenizer = train_tokenizer(["The cat sat on the mat.", "Die Katze saß auf der Matte."] * 5, vocab_size=40)
    config = FusionTransformerConfig(vocab_size=len(tokenizer) + 10)
    with pytest.raises(ModelLoadError, match=rf"config.vocab_size={len(tokenizer) + 10} > len\(tokenizer\)={len(tokenizer)}"):
        check_tokenizer_fits(tokenizer, config)


# --- 13. one line and a distinct exit status per class of failure -------------------------------
@pytest.mark.parametrize(
    "error, status, expected",
    [
        (OSError(errno.ENOSPC, "No space left on device", "/runs/x/checkpoint-4/optimizer.pt"), EXIT_FILESYSTEM,
         "No space left on device (/runs/x/checkpoint-4/optimizer.pt): free some space"),
        (PermissionError(errno.EACCES, "Permission denied", "/runs/x"), EXIT_FILESYSTEM, "fix the permissions"),
        (KeyboardInterrupt(), EXIT_INTERRUPTED, "--resume_from_checkpoint true"),
    ],
    ids=["disk_full", "permission", "interrupt"],
)
def test_anticipated_failures_are_one_line_with_their_exit_status(
    error: BaseException, status: int, expected: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from training import cli

    def fail(argv: list[str]) -> int:
        raise error

    monkeypatch.setitem(cli.HANDLERS, "train", fail)
    assert main(["train", "x.yaml"]) == status
    assert expected in _one_error_line(capsys.readouterr().err)


def test_an_unexpected_failure_keeps_its_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    from training import cli

    def fail(argv: list[str]) -> int:
        raise ZeroDivisionError("a bug")

    monkeypatch.setitem(cli.HANDLERS, "train", fail)
    with pytest.raises(ZeroDivisionError):
        main(["train", "x.yaml"])
