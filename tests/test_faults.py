"""Faults and hostile-but-realistic input: what ``hf-fusion`` guarantees (docs/guarantees.md).

Each test pins one guarantee so that a later change cannot quietly undo it: credentials are never
written anywhere, the library never changes the system's packages, a half-written checkpoint does
not strand a run, one output folder holds one run, generation and length settings fail before the
first step, and every malformed data file gets one line naming the file, the line and the fix.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from training.arguments import parse_experiment
from training.cli import main
from tests.cli_helpers import CONFIG_DIR

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
