"""Saved checkpoints keep working: the committed golden folders (tests/golden, written by
scripts/make_golden.py with the model code of their day) load with ``trust_remote_code`` in a
process that cannot import hf_fusion, under the installed transformers, and reproduce the logits
and generations they gave when saved; cached generation agrees with teacher forcing step by step.

The ``legacy_5_23_*`` folders carry the code from before transformers 5.24 renamed the generation
cache: on 5.24 and later their cached generation is wrong, and ``hf-fusion refresh-code`` fixes it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from hf_fusion import refresh_model_code
from hf_fusion.compat import CACHE_FIELD
from tests.helpers import run_in_clean_process
from training.cli import main as cli_main

pytestmark = pytest.mark.slow  # not in make test-fast

GOLDEN = Path(__file__).resolve().parent / "golden"
CURRENT = sorted(path.name for path in GOLDEN.iterdir() if (path / "golden.json").is_file() and not path.name.startswith("legacy_"))
LEGACY = sorted(path.name for path in GOLDEN.iterdir() if path.name.startswith("legacy_"))

# Run in the clean process: load each folder, compare with its golden outputs, and measure how far
# cached greedy step logits are from a teacher-forced forward. Writes report.json.
CHECK = """
import json, sys
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSeq2SeqLM
import importlib
def importable(name):
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True
assert not importable("hf_fusion"), "hf_fusion must not be importable here"
report = {}
for folder in sys.argv[1:]:
    model = AutoModelForSeq2SeqLM.from_pretrained(folder, trust_remote_code=True).eval()
    assert "hf_fusion" not in type(model).__module__
    golden = load_file(folder + "/golden.safetensors")
    inputs = {name: golden[name] for name in ("input_ids", "attention_mask", "decoder_input_ids")}
    source = {name: golden[name] for name in ("input_ids", "attention_mask")}
    kwargs = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False)
    with torch.no_grad():
        logits = model(**inputs, use_cache=False).logits.float()
        greedy = model.generate(**source, num_beams=1, use_cache=False, **kwargs)
        beam = model.generate(**source, num_beams=3, use_cache=False, **kwargs)
        cached = model.generate(**source, num_beams=1, output_logits=True, return_dict_in_generate=True, **kwargs)
        forced = model(**source, decoder_input_ids=cached.sequences[:, :-1], use_cache=False).logits.float()
    report[folder] = {
        "logits": (logits - golden["logits"]).abs().max().item(),
        "greedy": torch.equal(greedy, golden["greedy"]),
        "beam": torch.equal(beam, golden["beam"]),
        "cached_vs_teacher_forced": (torch.stack(cached.logits, 1).float() - forced).abs().max().item(),
    }
json.dump(report, open("report.json", "w"))
"""


def check_in_clean_process(folders: list[Path], tmp_path: Path) -> dict[str, dict]:
    script = tmp_path / "check.py"
    script.write_text(CHECK)
    arguments = [str(folder) for folder in folders]
    run_in_clean_process(f"import runpy, sys; sys.argv = ['check', *{arguments!r}]; runpy.run_path({str(script)!r})", tmp_path)
    return json.loads((tmp_path / "report.json").read_text())


def test_every_family_has_a_golden() -> None:
    families = {json.loads((GOLDEN / name / "golden.json").read_text())["hf_fusion_model_type"] for name in CURRENT}
    assert families == {"fusion_transformer", "encoder_fusion", "surface_fusion", "recurrent_stacking", "depthwise_lstm"}


def test_golden_checkpoints_reproduce_their_outputs(tmp_path: Path) -> None:
    report = check_in_clean_process([GOLDEN / name for name in CURRENT], tmp_path)
    for folder, result in report.items():
        name = Path(folder).name
        assert result["logits"] <= 1e-5, (name, result)
        assert result["greedy"] and result["beam"], (name, result)
        assert result["cached_vs_teacher_forced"] <= 1e-5, (name, result)


@pytest.mark.parametrize("name", LEGACY)
def test_refresh_code_repairs_a_folder_saved_before_the_cache_rename(name: str, tmp_path: Path, capsys) -> None:
    folder = tmp_path / name
    shutil.copytree(GOLDEN / name, folder)
    before = check_in_clean_process([folder], tmp_path)[str(folder)]
    # Forward passes and uncached generation were never affected.
    assert before["logits"] <= 1e-5 and before["greedy"] and before["beam"], before
    if CACHE_FIELD == "cache":  # transformers >= 5.24: the old code decodes with an empty cache
        assert before["cached_vs_teacher_forced"] > 1e-3, before
    assert not (folder / "compat.py").exists()
    assert cli_main(["refresh-code", str(folder)]) == 0
    assert "compat.py" in capsys.readouterr().out
    refreshed_folder = tmp_path / f"{name}_refreshed"  # a new name: remote code is cached per folder name
    folder.rename(refreshed_folder)
    after = check_in_clean_process([refreshed_folder], tmp_path)[str(refreshed_folder)]
    assert after["logits"] <= 1e-5 and after["greedy"] and after["beam"], after
    assert after["cached_vs_teacher_forced"] <= 1e-5, after


def test_refresh_code_refuses_what_is_not_an_hf_fusion_folder(tmp_path: Path, capsys) -> None:
    with pytest.raises(FileNotFoundError, match="no config.json"):
        refresh_model_code(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bart"}))
    with pytest.raises(ValueError, match="not an hf_fusion family"):
        refresh_model_code(tmp_path)
    assert cli_main(["refresh-code", str(tmp_path)]) == 2
    assert "not an hf_fusion family" in capsys.readouterr().err


def test_refresh_code_refuses_a_folder_whose_plan_the_current_code_defines_differently(tmp_path: Path) -> None:
    folder = tmp_path / "cycle_rev"
    shutil.copytree(GOLDEN / "recurrent_stacking_cycle_rev", folder)  # 3 steps over 2 blocks
    before = {path.name: path.read_bytes() for path in folder.glob("*.py")}
    with pytest.raises(ValueError, match="not divisible by"):
        refresh_model_code(folder)
    assert {path.name: path.read_bytes() for path in folder.glob("*.py")} == before
