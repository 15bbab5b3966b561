"""Paper presets (training/configs/presets/): each one equals, field by field, the table in
docs/presets.md that cites where the paper or the authors' code states the value, in both
directions; each parses into a valid run (a dry parse: no data, no training); and the derived
numbers (schedules, the tensor2tensor peak learning rate, the sharing plans) match independent
computations of the papers' formulas and code."""

from __future__ import annotations

import math
import re
from enum import Enum
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from transformers import AutoConfig, get_scheduler

import hf_fusion  # noqa: F401  (registers the hf_fusion model types with the Auto classes)
from training.arguments import MODEL_CONFIG_KEY, load_settings, parse_experiment
from training.e2s2.pretrain import RECIPE_PREFIX, parse_pretrain_arguments

ROOT = Path(__file__).resolve().parent.parent
PRESET_DIR = ROOT / "training" / "configs" / "presets"
DOCS = ROOT / "docs" / "presets.md"
PRESETS = sorted(PRESET_DIR.glob("*.yaml"))
TRANSLATION_PRESETS = [path for path in PRESETS if not path.name.startswith(RECIPE_PREFIX)]
E2S2_PRESETS = [path for path in PRESETS if path.name.startswith(RECIPE_PREFIX)]

# Keys that adapt a run to the pipeline or the built-in corpus, not to the paper (docs/presets.md,
# "How to read the tables"): they need no row in the tables.
PIPELINE_KEYS = {
    "extends", "output_dir", "eval_steps", "save_steps", "logging_steps", "per_device_eval_batch_size",
    "max_eval_samples",
    # the corpus and validation settings every shipped config inherits from base.yaml
    "dataset", "source_lang", "target_lang", "max_source_length", "max_target_length", "eval_strategy",
    "save_strategy", "save_total_limit", "load_best_model_at_end", "metric_for_best_model", "greater_is_better",
    "predict_with_generate", "generation_num_beams", "report_to",
}  # fmt: skip
# ... except where a recipe states them itself (the E2S2 presets cite train.sh's checkpoint limit).
E2S2_PIPELINE_KEYS = {"logging_steps"}

HEADING = re.compile(r"^### `([\w.]+\.yaml)`\s*$")
ROW = re.compile(r"^\| `([\w.]+)` \| `([^`]*)` \| (.+) \|\s*$")
INHERITS = re.compile(r"^Other fields: as in `([\w.]+\.yaml)`\.\s*$")


def documented_tables() -> dict[str, dict[str, Any]]:
    """docs/presets.md's tables: preset file name -> {field: value (YAML-typed)}, a table that
    says "Other fields: as in `X.yaml`" merged over X's."""
    own: dict[str, dict[str, Any]] = {}
    parents: dict[str, str] = {}
    current = None
    for line in DOCS.read_text(encoding="utf-8").splitlines():
        if heading := HEADING.match(line):
            current = heading.group(1)
            assert current not in own, f"docs/presets.md has two tables for {current}"
            own[current] = {}
        elif line.startswith("## "):
            current = None
        elif current and (inherits := INHERITS.match(line)):
            parents[current] = inherits.group(1)
        elif current and (row := ROW.match(line)):
            field, value = row.group(1), yaml.safe_load(row.group(2))
            assert field not in own[current], f"{current}: {field} documented twice"
            assert row.group(3).strip(), f"{current}: {field} has no source"
            own[current][field] = value

    def resolved(name: str) -> dict[str, Any]:
        return {**(resolved(parents[name]) if name in parents else {}), **own[name]}

    return {name: resolved(name) for name in own}


TABLES = documented_tables()


def flatten(settings: dict[str, Any]) -> dict[str, Any]:
    """``{"model_config": {"d_model": 512}, "seed": 1}`` -> ``{"model_config.d_model": 512, "seed": 1}``."""
    flat = {key: value for key, value in settings.items() if key != MODEL_CONFIG_KEY}
    for key, value in (settings.get(MODEL_CONFIG_KEY) or {}).items():
        flat[f"{MODEL_CONFIG_KEY}.{key}"] = value
    return flat


def plain(value: Any) -> Any:
    return value.value if isinstance(value, Enum) else value


def parsed_value(parsed: tuple[object, ...], model_config: dict[str, Any], field: str) -> Any:
    """The value a parsed run uses for ``field`` (a dataclass attribute, or a config field)."""
    if field.startswith(MODEL_CONFIG_KEY + "."):
        name = field.split(".", 1)[1]
        assert name in model_config, f"{field} is documented but the preset does not set it"
        return model_config[name]
    holders = [arguments for arguments in parsed if hasattr(arguments, field)]
    assert holders, f"{field} is documented but is no option of the command"
    return plain(getattr(holders[0], field))


def check_equal(name: str, field: str, documented: Any, actual: Any) -> None:
    # YAML reads 5e-4 (no dot) as a string: a number must be written so that it parses as one.
    if isinstance(documented, str):
        with pytest.raises(ValueError):
            float(documented)
    assert type(actual) is type(documented) or {type(actual), type(documented)} == {int, float}, (name, field)
    assert actual == documented, f"{name}: {field} is {actual!r}, docs/presets.md says {documented!r}"


def test_every_preset_has_a_table_and_every_table_a_preset():
    assert {path.name for path in PRESETS} == set(TABLES)
    assert len(TRANSLATION_PRESETS) >= 7 and len(E2S2_PRESETS) == 2


@pytest.mark.parametrize("path", TRANSLATION_PRESETS, ids=lambda path: path.stem)
def test_translation_preset_equals_its_table_field_by_field(path):
    experiment = parse_experiment(path)  # a dry parse: no corpus, no tokenizer, no model
    table = TABLES[path.name]
    parsed = (experiment.model, experiment.data, experiment.training)
    for field, documented in table.items():
        check_equal(path.name, field, documented, parsed_value(parsed, experiment.model.model_config, field))

    # The other direction: every field the file sets itself (through its extends chain inside
    # presets/) and every paper field the resolved run inherits is in the table.
    resolved = flatten(load_settings(path))
    undocumented = sorted(set(resolved) - set(table) - PIPELINE_KEYS)
    assert not undocumented, f"{path.name} sets {undocumented} without a row in docs/presets.md"

    # The config the run will build takes every documented config field.
    config = AutoConfig.for_model(experiment.model.model_type, vocab_size=1000, **experiment.model.model_config)
    for field, documented in table.items():
        if field.startswith(MODEL_CONFIG_KEY + "."):
            assert getattr(config, field.split(".", 1)[1]) == documented, (path.name, field)


@pytest.mark.parametrize("path", E2S2_PRESETS, ids=lambda path: path.stem)
def test_e2s2_preset_equals_its_table_field_by_field(path):
    args, training, overrides = parse_pretrain_arguments(
        ["--recipe", str(path), "--model", "fusion_transformer", "--tokenizer", "TOK", "--output_dir", "out"]
    )
    table = TABLES[path.name]
    for field, documented in table.items():
        check_equal(path.name, field, documented, parsed_value((args, training), overrides, field))
    own = flatten(yaml.safe_load(path.read_text(encoding="utf-8")))
    undocumented = sorted(set(own) - set(table) - E2S2_PIPELINE_KEYS)
    assert not undocumented, f"{path.name} sets {undocumented} without a row in docs/presets.md"
    assert path == PRESET_DIR / f"{RECIPE_PREFIX}{path.stem[len(RECIPE_PREFIX):]}.yaml"  # reachable by --recipe NAME


def test_a_wrong_value_or_a_missing_row_is_caught(tmp_path):
    """The comparison fails on a preset that drifts from its table, in either direction."""
    preset = yaml.safe_load((PRESET_DIR / "surface_fusion_paper.yaml").read_text())
    preset["extends"] = str(PRESET_DIR.parent / "base.yaml")
    preset[MODEL_CONFIG_KEY]["dropout"] = 0.1
    preset["adam_epsilon"] = 1e-9
    drifted = tmp_path / "surface_fusion_paper.yaml"
    drifted.write_text(yaml.safe_dump(preset))
    with pytest.raises(AssertionError, match="dropout is 0.1, docs/presets.md says 0.3"):
        test_translation_preset_equals_its_table_field_by_field(drifted)
    preset[MODEL_CONFIG_KEY]["dropout"] = 0.3
    preset["adam_epsilon"] = 1.0e-08
    preset[MODEL_CONFIG_KEY]["init_std"] = 0.05
    drifted.write_text(yaml.safe_dump(preset))
    with pytest.raises(AssertionError, match=r"sets \['model_config.init_std'\] without a row"):
        test_translation_preset_equals_its_table_field_by_field(drifted)


def inverse_sqrt_reference(peak: float, warmup: int, step: int) -> float:
    """fairseq's and tensor2tensor's schedule: linear warmup, then peak · sqrt(warmup / step)."""
    return peak * step / warmup if step < warmup else peak * math.sqrt(warmup / step)


@pytest.mark.parametrize("path", TRANSLATION_PRESETS, ids=lambda path: path.stem)
def test_the_schedule_is_the_papers(path):
    training = parse_experiment(path).training
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=training.learning_rate)
    schedule = get_scheduler(training.lr_scheduler_type, optimizer, num_warmup_steps=training.warmup_steps)
    for step in (1, training.warmup_steps // 2, training.warmup_steps, 3 * training.warmup_steps, training.max_steps):
        expected = inverse_sqrt_reference(training.learning_rate, training.warmup_steps, step)
        assert schedule.lr_lambdas[0](step) * training.learning_rate == pytest.approx(expected, rel=1e-12), step


def test_recurrent_stacking_peak_is_tensor2tensors():
    """transformer_base: lr = 2.0 · d^-0.5 · min(1, step / warmup) · max(step, warmup)^-0.5, whose
    value at the end of the warmup is the preset's peak learning rate."""
    experiment = parse_experiment(PRESET_DIR / "recurrent_stacking_paper.yaml")
    d_model, warmup = experiment.model.model_config["d_model"], experiment.training.warmup_steps

    def t2t(step: int) -> float:
        return 2.0 * d_model**-0.5 * min(1.0, step / warmup) * max(step, warmup) ** -0.5

    assert experiment.training.learning_rate == pytest.approx(t2t(warmup), rel=1e-15)
    for step in (100, 8000, 16000, 40000, 250000):
        assert inverse_sqrt_reference(experiment.training.learning_rate, warmup, step) == pytest.approx(t2t(step), rel=1e-12)


def takase_kiyono_plan(share_type: str, layers: int, layers_per_block: int) -> list[int]:
    """The block each layer runs in the authors' code (the encoder constructor of their fairseq
    fork, with ``--share-layer-num`` layers per block), restated as block indices."""
    if share_type == "sequence":
        return [step // layers_per_block for step in range(layers)]
    blocks = -(-layers // layers_per_block)
    plan = list(range(blocks))
    if share_type == "cycle":
        return plan + [step % blocks for step in range(layers - blocks)]
    plan += [step % blocks for step in range(layers - 2 * blocks)]
    return plan + [plan[:blocks][-((step % blocks) + 1)] for step in range(layers - len(plan))]


@pytest.mark.parametrize(("name", "share_type"), [("cycle_rev", "cycle_reverse"), ("cycle", "cycle"), ("sequence", "sequence")])
def test_sharing_presets_run_the_authors_schedule(name, share_type):
    experiment = parse_experiment(PRESET_DIR / f"sharing_{name}_paper.yaml")
    config = AutoConfig.for_model(experiment.model.model_type, vocab_size=1000, **experiment.model.model_config)
    # README: --encoder-layers 12 --decoder-layers 12 --share-layer-num 2
    expected = takase_kiyono_plan(share_type, layers=12, layers_per_block=2)
    assert list(config.encoder_plan) == expected and list(config.decoder_plan) == expected
    assert len(set(expected)) == 6
