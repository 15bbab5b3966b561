"""``hf-fusion compare``: the statistics against independent computations, the resumable runner
(finished cells skipped, killed cells resumed, stale cells re-run), the report, and (slow) real
grids of tiny models, the GPU preset's script included."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from training.compare import grid as grid_module
from training.compare import runner
from training.compare.grid import GridError, cell_hash, load_grid
from training.compare.report import README_END, README_START, bootstrap_tests, write_report
from training.compare.stats import mean_interval, t_quantile, verdict

from .cli_helpers import CONFIG_DIR, REPO_ROOT, requires_ding

# Two-sided 95% critical values of Student's t, from a printed table (e.g. NIST/SEMATECH
# e-Handbook, table 1.3.6.7.2): df -> t_{0.975, df}.
T_TABLE = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 9: 2.262, 29: 2.045}


# --- statistics ------------------------------------------------------------------------------------
@pytest.mark.parametrize("df", sorted(T_TABLE))
def test_t_quantile_matches_the_printed_table(df):
    assert t_quantile(0.975, df) == pytest.approx(T_TABLE[df], abs=5e-4)
    assert t_quantile(0.025, df) == pytest.approx(-T_TABLE[df], abs=5e-4)


def test_mean_interval_by_hand():
    # 1, 2, 3, 4: mean 2.5, sample variance (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5/3.
    interval = mean_interval([1.0, 2.0, 3.0, 4.0])
    assert interval.mean == 2.5
    assert interval.half == pytest.approx(3.182446 * math.sqrt(5 / 3) / 2, rel=1e-5)
    assert interval.n == 4
    assert math.isnan(mean_interval([7.0]).half) and mean_interval([7.0]).format() == "7.00"


def test_verdicts_read_the_interval():
    from training.compare.stats import Interval

    assert verdict(Interval(1.0, 0.5, 3), "greater") == "reproduced"
    assert verdict(Interval(1.0, 1.5, 3), "greater") == "not significant"
    assert verdict(Interval(-1.0, 0.5, 3), "greater") == "contradicted"
    assert verdict(Interval(-0.5, 0.4, 3), "close", margin=1.0) == "reproduced"  # interval above -1
    assert verdict(Interval(-2.0, 0.4, 3), "close", margin=1.0) == "contradicted"
    assert verdict(Interval(1.0, math.nan, 1), "greater") == "pending"
    with pytest.raises(ValueError, match="claim kind = 'better'.*greater, close"):
        verdict(Interval(1.0, 0.5, 3), "better")


def test_a_relative_margin_scales_with_the_baseline(tmp_path):
    """'Within 4% of b': 1.08 BLEU at b = 27, 0.006 at the BLEU floor, where a small absolute
    gap no longer counts as close."""
    from training.compare.report import claim_margin, claim_rows

    assert claim_margin({"relative_margin": 0.04}, [25.0, 27.0, 29.0]) == pytest.approx(1.08)
    assert claim_margin({"margin": 1.0}, [0.1]) == 1.0
    claim = {"id": "c", "paper": "P", "claim": "a close to b", "kind": "close", "relative_margin": 0.04,
             "a": "rs", "b": "vanilla", "metric": "bleu"}
    grid = load_grid(_write_grid(tmp_path, seeds=[0, 1, 2], claims=[claim]))

    def cells(bleus):
        return {seed: {"bleu": bleu, "chrf": 10 * bleu, "nll": 5.0} for seed, bleu in enumerate(bleus)}

    # a - b = -0.5 +- 0.1 BLEU: close to b = 27 (threshold -1.08), not to b = 1 (threshold -0.04).
    high = claim_rows(grid, {("ding", "s4", "rs"): cells([26.4, 26.5, 26.6]), ("ding", "s4", "vanilla"): cells([26.9, 27.0, 27.1])})
    low = claim_rows(grid, {("ding", "s4", "rs"): cells([0.4, 0.5, 0.6]), ("ding", "s4", "vanilla"): cells([0.9, 1.0, 1.1])})
    assert high[0]["verdict"] == "reproduced" and low[0]["verdict"] == "contradicted"
    assert high[0]["others"] == {"chrf": "reproduced", "nll": "reproduced"}  # equal NLLs are within any margin


def _bleu_from_stats(stats: np.ndarray) -> float:
    """Corpus BLEU from summed sacreBLEU statistics [hyp len, ref len, correct 1-4, total 1-4]
    (no smoothing needed: the test data has matches of every order)."""
    hyp_len, ref_len, correct, total = stats[0], stats[1], stats[2:6], stats[6:10]
    brevity = 1.0 if hyp_len > ref_len else math.exp(1.0 - ref_len / hyp_len)
    return 100.0 * brevity * math.exp(sum(math.log(c / t) for c, t in zip(correct, total)) / 4.0)


@requires_ding
def test_paired_bootstrap_matches_an_independent_resampling(tmp_path):
    """The report's p-value equals a from-scratch paired bootstrap: 1,000 resamples of the test
    set (sacreBLEU's seed), BLEU recomputed per resample, p = (#{|d_i| - mean|d| > |d|} + 1) / 1001."""
    from sacrebleu.metrics import BLEU

    from training.data import load_parallel_data

    references = list(load_parallel_data(dataset_name="ding")["test"]["target"])
    baseline = [" ".join(line.split()[:-1]) if index % 3 == 0 else line for index, line in enumerate(references)]
    other = [" ".join(line.split()[:-1]) if index % 5 == 0 else line for index, line in enumerate(references)]
    (tmp_path / "predictions").mkdir()
    records = {}
    for name, lines in (("base", baseline), ("other", other)):
        (tmp_path / "predictions" / f"{name}.txt").write_text("\n".join(lines) + "\n")
        records[name] = {"hash": name, "predictions": f"predictions/{name}.txt"}
    groups = {("ding", "b", "base"): {0: records["base"]}, ("ding", "b", "other"): {0: records["other"]}}
    reported = bootstrap_tests(tmp_path, groups, "base", {})[("ding", "b", "other")][0]["bleu"]

    metric = BLEU()
    stats = [np.array(metric._extract_corpus_statistics(lines, [references]), dtype=np.float64) for lines in (baseline, other)]
    real = abs(_bleu_from_stats(stats[0].sum(0)) - _bleu_from_stats(stats[1].sum(0)))
    indices = np.random.default_rng(12345).choice(len(references), size=(1000, len(references)), replace=True)
    differences = np.abs(
        np.array([_bleu_from_stats(stats[1][rows].sum(0)) - _bleu_from_stats(stats[0][rows].sum(0)) for rows in indices])
    )
    expected = (np.sum(differences - differences.mean() > real) + 1) / 1001
    assert reported["other"] - reported["baseline"] == pytest.approx(
        _bleu_from_stats(stats[1].sum(0)) - _bleu_from_stats(stats[0].sum(0)), abs=1e-6
    )
    assert reported["p_value"] == pytest.approx(expected, abs=1e-9)
    assert reported["p_value"] < 0.05  # 1 in 3 vs 1 in 5 truncated sentences: a real difference


# --- per-cell measurements --------------------------------------------------------------------------
def test_test_nll_is_the_unsmoothed_token_cross_entropy():
    """Over length-bucketed batches, the NLL equals the model's own unsmoothed loss over one
    batch of every pair (padding excluded either way), and the FLOP count grows with the batch."""
    import torch

    from training.batching import PairCollator
    from training.compare.measure import flops_per_step, test_nll

    from .cli_helpers import random_pairs
    from .helpers import build_tiny

    model = build_tiny(label_smoothing=0.0).eval()
    pairs = random_pairs([(5, 4), (7, 3), (3, 6), (9, 8), (4, 4)])
    tokenizer = type("Tokenizer", (), {"pad_token_id": model.config.pad_token_id})()
    settings = {"max_tokens_per_batch": 16, "per_device_train_batch_size": 2}
    with torch.no_grad():
        everything = PairCollator(model.config.pad_token_id)([pairs[index] for index in range(len(pairs))])
        expected = float(model(**everything).loss)
    assert test_nll(model, tokenizer, pairs, settings) == pytest.approx(expected, rel=1e-5)
    small = flops_per_step(model, tokenizer, pairs, settings)
    large = flops_per_step(model, tokenizer, pairs, {"max_tokens_per_batch": 64, "per_device_train_batch_size": 5})
    assert 0 < small < large


# --- the grid file and the cell identity -------------------------------------------------------
def _write_grid(tmp_path: Path, **changes) -> Path:
    spec = {
        "name": "tiny",
        "config": str(CONFIG_DIR / "fusion_transformer_debug.yaml"),
        "seeds": [0, 1],
        "corpora": ["ding"],
        "budgets": [{"name": "s4", "overrides": {"max_steps": 4, "save_steps": 2, "eval_steps": 2}}],
        "overrides": {"report_to": "none", "disable_tqdm": True, "max_train_samples": 64, "plot_training_curves": False},
        "baseline": "vanilla",
        "variants": [
            {"name": "vanilla", "model_type": "fusion_transformer"},
            {"name": "rs", "model_type": "recurrent_stacking", "model_config": {"sharing_strategy": "recurrent"}},
        ],
        "claims": [{"id": "rs_vs_vanilla", "paper": "P", "claim": "rs beats vanilla", "kind": "greater",
                    "a": "rs", "b": "vanilla", "metric": "bleu"}],
        "analyses": [{"id": "speed", "paper": "P", "claim": "rs decodes faster", "kind": "decoding_speed",
                      "a": "rs", "b": "vanilla"}],
    }
    spec.update(changes)
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_grid_errors_name_the_field(tmp_path):
    with pytest.raises(GridError, match="unknown field 'seed'"):
        load_grid(_write_grid(tmp_path, seed=[0]))
    with pytest.raises(GridError, match="no variant 'bart'"):
        load_grid(_write_grid(tmp_path, baseline="bart"))
    teacherless = [{"name": "rs_kd", "model_type": "recurrent_stacking", "distill": {"teacher": "vanilla"}}]
    with pytest.raises(GridError, match="distill.teacher = 'vanilla' must name an earlier variant"):
        load_grid(_write_grid(tmp_path, variants=teacherless, baseline="rs_kd"))


def test_cell_hash_follows_the_resolved_config(tmp_path, monkeypatch):
    """A field the grid never names still changes the hash when the family's default changes,
    because the hash is taken over the config the family class builds."""
    from transformers import AutoConfig

    grid = load_grid(_write_grid(tmp_path))
    cell = grid.cells()[0]
    before = cell_hash(grid, cell)
    assert cell_hash(grid, cell) == before  # deterministic
    assert cell_hash(grid, grid.cells()[1]) != before  # another seed
    # Adding a variant (here a pretrained one) leaves the recorded cells' identities alone.
    extra = {"name": "e2s2", "model_type": "fusion_transformer", "pretrain": {"objective": "e2s2", "max_steps": 2}}
    bigger = load_grid(_write_grid(tmp_path, variants=[*yaml.safe_load(grid.path.read_text())["variants"], extra]))
    assert cell_hash(bigger, bigger.cells()[0]) == before
    assert cell_hash(bigger, bigger.cell("e2s2", 0, "ding", bigger.budgets[0])) != cell_hash(grid, cell)

    original = AutoConfig.for_model

    def changed_default(model_type, **fields):
        config = original(model_type, **fields)
        config.init_std = 0.05  # as if the family's default had changed
        return config

    monkeypatch.setattr(AutoConfig, "for_model", changed_default)
    assert cell_hash(grid, cell) != before


def test_options_of_an_unused_seam_do_not_enter_the_hash(tmp_path, monkeypatch):
    """A new option of a seam the model does not use (here a SurfaceFusion field on a vanilla
    model) leaves the cell's identity alone; the same field on a model that uses the seam, or a
    change of a field the model reads, does not."""
    from transformers import AutoConfig

    from training.compare.grid import effective_model_config

    vanilla = AutoConfig.for_model("fusion_transformer").to_dict()
    kept = effective_model_config(vanilla)
    assert not any(key.startswith(("dlstm_", "surface_fusion_", "fusion_")) for key in kept)
    assert "d_model" in kept and "transformers_version" not in kept
    surface = effective_model_config(AutoConfig.for_model("surface_fusion").to_dict())
    assert "surface_fusion_lambda" in surface and "dlstm_activation" not in surface
    fine_grained = effective_model_config(AutoConfig.for_model("encoder_fusion", fusion_mode="fine_grained").to_dict())
    assert fine_grained["fusion_double_embedding_dropout"] is True

    grid = load_grid(_write_grid(tmp_path))
    cell = grid.cells()[0]
    before = cell_hash(grid, cell)
    original = AutoConfig.for_model

    def with_field(name, value):
        def build(model_type, **fields):
            config = original(model_type, **fields)
            setattr(config, name, value)
            return config

        return build

    monkeypatch.setattr(AutoConfig, "for_model", with_field("surface_fusion_new_option", 3))
    assert cell_hash(grid, cell) == before
    monkeypatch.setattr(AutoConfig, "for_model", with_field("dropout", 0.25))
    assert cell_hash(grid, cell) != before


def test_rekey_keeps_a_run_trained_with_the_current_settings_and_no_other(tmp_path):
    """``--rekey`` reads the run folder back: a recorded cell under an outdated hash is re-keyed
    when its saved config and experiment are exactly what the cell asks for now (the tokenizer's
    fields aside), and left stale when the saved model differs in a field it reads."""
    from transformers import AutoConfig

    from training.arguments import parse_experiment
    from training.compare.grid import merged_overrides, override_tokens

    grid = load_grid(_write_grid(tmp_path))
    results_dir = tmp_path / "results"
    results_dir.mkdir()
    records = []
    for cell, dropout in zip(grid.cells()[:2], (None, 0.37)):
        run_dir = tmp_path / "runs" / cell.slug
        final = run_dir / "final"
        final.mkdir(parents=True)
        experiment = parse_experiment(grid.config, override_tokens(merged_overrides(grid, cell)))
        (final / "experiment.yaml").write_text(experiment.to_yaml())
        fields = {**experiment.model.model_config, "vocab_size": 123, "pad_token_id": 1}
        if dropout is not None:
            fields["dropout"] = dropout  # this run trained another model than the cell asks for
        AutoConfig.for_model(experiment.model.model_type, **fields).save_pretrained(final)
        records.append({"key": cell.key, "hash": "outdated", "run_dir": str(run_dir), "bleu": 1.0})
    (results_dir / runner.RESULTS_NAME).write_text("".join(json.dumps(record) + "\n" for record in records))

    first, second = grid.cells()[:2]
    assert runner.rekey_equivalent(grid, results_dir) == [first.key]
    recorded = runner.read_results(results_dir / runner.RESULTS_NAME)
    assert recorded[first.key]["hash"] == cell_hash(grid, first) and recorded[first.key]["rekeyed_from"] == "outdated"
    assert recorded[second.key]["hash"] == "outdated"
    states = {cell.key: state for cell, _, state in runner.cell_states(grid, results_dir, tmp_path / "work")}
    assert states[first.key] == "done" and states[second.key] == "stale"
    # A student of the re-keyed cell finds it in the folder it was trained in, not under its new hash.
    assert runner.finished_dir(tmp_path / "work", results_dir, first, cell_hash(grid, first)) == tmp_path / "runs" / first.slug
    assert runner.finished_dir(tmp_path / "work", results_dir, second, cell_hash(grid, second)) == runner.cell_dir(
        tmp_path / "work", second, cell_hash(grid, second))


# --- the runner, with the training replaced by a fake ------------------------------------------
class FakeTraining:
    """Stands in for ``python -m training.cli train``: records the command, writes what a
    finished run writes (or, if told to, dies after its first checkpoint)."""

    def __init__(self):
        self.commands: list[list[str]] = []
        self.die = False

    def __call__(self, command: list[str], log: Path) -> None:
        self.commands.append(command)
        run_dir = Path(command[command.index("--output_dir") + 1])
        (run_dir / "checkpoint-2").mkdir(parents=True, exist_ok=True)
        (run_dir / "checkpoint-2" / "model.safetensors").write_bytes(b"w")
        (run_dir / "checkpoint-2" / "trainer_state.json").write_text(json.dumps({"log_history": []}))
        if self.die:
            raise runner.CellFailed("killed")
        (run_dir / "results.json").write_text("{}")


def _fake_measure(grid, cell, digest, run_dir, results_dir):
    return {"key": cell.key, "hash": digest, "bleu": float(cell.seed), "run_dir": str(run_dir)}


@pytest.fixture
def fake_runner(monkeypatch):
    training = FakeTraining()
    monkeypatch.setattr(runner, "_run", training)
    monkeypatch.setattr(runner, "measure_cell", _fake_measure)
    return training


def test_runner_skips_finished_resumes_killed_and_reruns_stale(tmp_path, fake_runner):
    grid = load_grid(_write_grid(tmp_path))
    work, results = tmp_path / "work", tmp_path / "results"
    assert len(runner.run_grid(grid, work, results)) == 4
    assert len(fake_runner.commands) == 4
    assert not any("--resume_from_checkpoint" in command for command in fake_runner.commands)
    # Finished: nothing runs again.
    assert runner.run_grid(grid, work, results) == []
    assert len(fake_runner.commands) == 4

    # Killed: a stale cell dies after its first checkpoint; the next run resumes it.
    changed = load_grid(_write_grid(tmp_path, overrides={**grid.overrides, "max_train_samples": 32}))
    fake_runner.die = True
    with pytest.raises(runner.GridFailures, match="1 cell.*vanilla/ding/s4/seed0: killed"):
        runner.run_grid(changed, work, results, max_cells=1)
    states = [state for _, _, state in runner.cell_states(changed, results, work)]
    assert states == ["partial", "stale", "stale", "stale"]
    fake_runner.die = False
    runner.run_grid(changed, work, results, max_cells=1)
    assert fake_runner.commands[-1][-2:] == ["--resume_from_checkpoint", "true"]
    # Stale: recorded under another hash, so they run afresh, in new folders.
    runner.run_grid(changed, work, results)
    assert len(fake_runner.commands) == 9
    records = runner.read_results(results / runner.RESULTS_NAME)
    assert {record["hash"] for record in records.values()} == {cell_hash(changed, cell) for cell in changed.cells()}
    assert len(list((work / "cells").iterdir())) == 8  # old and new folders side by side
    # The optimizer checkpoints of cells not kept for analyses are removed once recorded.
    assert not any((work / "cells").glob("*/checkpoint-*"))


def test_two_runners_share_a_work_folder(tmp_path, fake_runner, monkeypatch):
    grid = load_grid(_write_grid(tmp_path))
    work, results = tmp_path / "work", tmp_path / "results"
    cells = [(cell, digest) for cell, digest, _ in runner.cell_states(grid, results, work)]
    held_cell, held_digest = cells[0]
    # Another runner holds the first cell: this one skips it, without calling it a failure.
    with runner.file_lock(runner.cell_dir(work, held_cell, held_digest) / runner.CELL_LOCK) as held:
        assert held
        written = runner.run_grid(grid, work, results)
    assert [record["key"] for record in written] == [cell.key for cell, _ in cells[1:]]
    assert not any(str(runner.cell_dir(work, held_cell, held_digest)) in command for command in fake_runner.commands)
    # Released (its runner died): the next run takes it.
    assert [record["key"] for record in runner.run_grid(grid, work, results)] == [held_cell.key]

    # A cell another runner records after this one read the states is not trained again.
    changed = load_grid(_write_grid(tmp_path, overrides={**grid.overrides, "max_train_samples": 32}))
    first, second = [(cell, digest) for cell, digest, _ in runner.cell_states(changed, results, work)][:2]
    original = fake_runner.__call__

    def the_other_runner_records_the_next_cell(command, log):
        original(command, log)
        if str(runner.cell_dir(work, *first)) in command:
            runner.write_record(results / runner.RESULTS_NAME, _fake_measure(changed, second[0], second[1], work, results))

    monkeypatch.setattr(runner, "_run", the_other_runner_records_the_next_cell)
    written = runner.run_grid(changed, work, results)
    assert second[0].key not in [record["key"] for record in written]
    assert len(written) == 3
    assert {record["hash"] for record in runner.read_results(results / runner.RESULTS_NAME).values()} == {
        cell_hash(changed, cell) for cell in changed.cells()
    }


def _record_many(path: str, prefix: str, count: int) -> None:
    for number in range(count):
        runner.write_record(Path(path), {"key": f"{prefix}{number}", "bleu": float(number)})


def test_concurrent_recording_loses_no_record(tmp_path):
    import multiprocessing

    path = tmp_path / "results.jsonl"
    context = multiprocessing.get_context("fork")
    writers = [context.Process(target=_record_many, args=(str(path), prefix, 40)) for prefix in "ab"]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(60)
        assert writer.exitcode == 0
    assert sorted(runner.read_results(path)) == sorted(f"{prefix}{number}" for prefix in "ab" for number in range(40))


def test_a_failed_cell_does_not_stop_the_grid(tmp_path, fake_runner, monkeypatch):
    grid = load_grid(_write_grid(tmp_path))
    work, results = tmp_path / "work", tmp_path / "results"
    original = fake_runner.__call__

    def vanilla_fails(command, log):
        if "fusion_transformer" in command:
            raise runner.CellFailed(f"status 1; see {log}")
        original(command, log)

    monkeypatch.setattr(runner, "_run", vanilla_fails)
    with pytest.raises(runner.GridFailures, match="2 cell.*vanilla/ding/s4/seed0.*vanilla/ding/s4/seed1"):
        runner.run_grid(grid, work, results)
    assert sorted(runner.read_results(results / runner.RESULTS_NAME)) == ["rs/ding/s4/seed0", "rs/ding/s4/seed1"]


# --- the report ------------------------------------------------------------------------------------
@requires_ding
def test_report_aggregates_claims_and_fills_the_readme(tmp_path, monkeypatch):
    from training.compare import report as report_module

    # The records below are keyed by their cell key: make that the cells' current hash.
    monkeypatch.setattr(report_module, "cell_hash", lambda grid, cell, memo=None: cell.key)
    grid = load_grid(_write_grid(tmp_path, seeds=[0, 1, 2]))
    results = tmp_path / "results"
    (results / "predictions").mkdir(parents=True)
    from training.data import load_parallel_data

    references = list(load_parallel_data(dataset_name="ding")["test"]["target"])[:50]
    scores = {"vanilla": [10.0, 11.0, 12.5], "rs": [12.0, 13.5, 14.0]}
    for variant, bleus in scores.items():
        for seed, bleu in enumerate(bleus):
            lines = [line if (index + seed) % (2 if variant == "vanilla" else 4) else "x" for index, line in enumerate(references)]
            key = f"{variant}/ding/s4/seed{seed}"
            (results / "predictions" / f"{variant}{seed}.txt").write_text("\n".join(lines) + "\n")
            runner.write_record(results / runner.RESULTS_NAME, {
                "key": key, "variant": variant, "seed": seed, "corpus": "ding", "budget": "s4", "hash": key,
                "model_type": "x", "bleu": bleu, "chrf": 2 * bleu, "nll": 5.0 - bleu / 10, "parameters": 1000,
                "steps": 4, "flops_per_step": 2e9, "flops": 8e9, "train_seconds": 60.0,
                "predictions": f"predictions/{variant}{seed}.txt",
                "curves": [{"step": 2, "loss": 5.0 + seed, "eval_loss": 4.0, "eval_bleu": bleu}, {"step": 4, "loss": 4.0}],
            })
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{README_START}\nold\n{README_END}\nrest\n")
    report = write_report(grid, results, readme).read_text()

    differences = [2.0, 2.5, 1.5]  # rs - vanilla per seed: mean 2.0, sd 0.5
    half = T_TABLE[2] * 0.5 / math.sqrt(3)
    assert f"{2.0:.2f} ± {half:.2f} BLEU" in report
    assert "reproduced" in report  # 2.0 - 1.24 > 0
    assert f"{np.mean(scores['vanilla']):.2f} ± " in report
    assert "| P | rs decodes faster |  | pending: seeds 0, 1, 2 not analysed yet" in report  # no --analyses run
    assert "Cells finished: 6 of 6" in report
    assert (results / "curves_rs_vs_vanilla_ding_s4.png").stat().st_size > 1000
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith(f"{README_END}\nrest\n") and "old" not in text
    assert "| P | rs beats vanilla |" in text and f"{2.0:.2f} ± {half:.2f}" in text
    assert differences  # the per-seed differences the interval above was computed from
    # The exported model's step per seed (the first best validation BLEU), then the p-values per
    # seed against the baseline.
    assert "| 2, 2, 2 |" in report
    assert report.count("/3 < 0.05)") == 2  # BLEU and chrF columns of the rs row

    # A record made under settings the cell no longer has leaves the claims until it runs again.
    monkeypatch.setattr(report_module, "cell_hash", lambda grid, cell, memo=None: cell.key + ("x" if cell.seed == 2 else ""))
    report = write_report(grid, results, readme).read_text()
    assert "Cells finished: 4 of 6** (2 more recorded under settings the grid has since changed" in report
    assert f"{2.0:.2f} ± {half:.2f} BLEU" not in report


# --- real runs of tiny models (slow) ---------------------------------------------------------------
def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
@requires_ding
def test_a_tiny_grid_trains_resumes_transfers_and_distills(tmp_path):
    variants = [
        {"name": "vanilla", "model_type": "fusion_transformer"},
        {"name": "rs_transfer_kd", "model_type": "recurrent_stacking", "model_config": {"sharing_strategy": "recurrent"},
         "transfer": {"teacher": "vanilla"}, "distill": {"teacher": "vanilla", "num_beams": 2}},
        {"name": "e2s2", "model_type": "fusion_transformer", "pretrain": {"objective": "e2s2", "max_steps": 2, "batch_size": 8}},
    ]
    path = _write_grid(tmp_path, seeds=[0], variants=variants, claims=[], analyses=[],
                       keep_checkpoints=["rs_transfer_kd"])
    work, results = tmp_path / "work", tmp_path / "results"
    command = [sys.executable, "-m", "training.cli", "compare", str(path), "--work_dir", str(work),
               "--results_dir", str(results)]
    subprocess.run([*command, "--max_cells", "1"], check=True, env=_env(), cwd=REPO_ROOT)
    records = runner.read_results(results / runner.RESULTS_NAME)
    vanilla = records["vanilla/ding/s4/seed0"]
    assert vanilla["steps"] == 4 and vanilla["test_sentences"] == 16 and vanilla["nll"] > 0
    assert vanilla["flops_per_step"] > 0 and vanilla["flops"] == 4 * vanilla["flops_per_step"]
    assert [point["step"] for point in vanilla["curves"] if "eval_loss" in point] == [2, 4]

    # Kill the student after its first checkpoint: drop what the end of training writes.
    subprocess.run([*command, "--max_cells", "1"], check=True, env=_env(), cwd=REPO_ROOT)
    student_dir = next((work / "cells").glob("rs_transfer_kd*"))
    assert (student_dir / "transferred" / "config.json").is_file()
    kd_train = (student_dir / "distilled" / "train.jsonl").read_text().splitlines()
    assert len(kd_train) == 64  # the teacher's translations of the 64 training sources
    first = runner.read_results(results / runner.RESULTS_NAME)["rs_transfer_kd/ding/s4/seed0"]
    for name in ("results.json", "final", "checkpoint-4"):
        target = student_dir / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    lines = (results / runner.RESULTS_NAME).read_text().splitlines()
    (results / runner.RESULTS_NAME).write_text("".join(line + "\n" for line in lines if "rs_transfer_kd" not in line))
    subprocess.run(command, check=True, env=_env(), cwd=REPO_ROOT)
    log = (student_dir / "train.log").read_text()
    assert "--resume_from_checkpoint true" in log and "resuming from" in log
    resumed = runner.read_results(results / runner.RESULTS_NAME)["rs_transfer_kd/ding/s4/seed0"]
    assert resumed["steps"] == 4 and resumed["hash"] == first["hash"]
    # The curve spans the kill: the validation before it (step 2) and after it (step 4).
    assert [point["step"] for point in resumed["curves"] if "eval_loss" in point] == [2, 4]
    assert resumed["parameters"] < vanilla["parameters"]  # one shared layer per stack
    assert "rs_transfer_kd" in (results / "report.md").read_text()
    # The pretrained variant: pretrained (2 steps) with the tokenizer the cell trains, then fine-tuned.
    pretrained = runner.read_results(results / runner.RESULTS_NAME)["e2s2/ding/s4/seed0"]
    assert pretrained["pretrain_steps"] == 2 and pretrained["steps"] == 4
    e2s2_dir = next((work / "cells").glob("e2s2__*"))
    assert json.loads((e2s2_dir / "pretrained" / "trainer_state.json").read_text())["global_step"] == 2
    assert "--model_name_or_path" in (e2s2_dir / "train.log").read_text()


@pytest.mark.slow
@requires_ding
def test_the_gpu_script_runs_one_cell_of_the_preset_at_tiny_size(tmp_path):
    """The GPU preset, shrunk to a tiny model and fp32, through benchmarks/gpu_evidence.sh on CPU."""
    spec = yaml.safe_load((REPO_ROOT / "benchmarks/grids/gpu_claims.yaml").read_text())
    spec["extends"] = str(REPO_ROOT / "benchmarks/grids" / spec["extends"])
    tiny = {"d_model": 32, "encoder_layers": 3, "decoder_layers": 3, "encoder_attention_heads": 2,
            "decoder_attention_heads": 2, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64}
    spec["overrides"] = {**spec["overrides"], "precision": "fp32", "max_train_samples": 64, "max_eval_samples": 8,
                         "max_test_samples": 8, "tokenizer_vocab_size": 400, "generation_max_length": 24,
                         "model_config": {**spec["overrides"].get("model_config", {}), **tiny}}
    spec["corpora"] = ["ding"]
    spec["budgets"] = [{"name": "tiny", "overrides": {"max_steps": 2, "warmup_steps": 1, "eval_steps": 2, "save_steps": 2}}]
    grid_file = tmp_path / "gpu_tiny.yaml"
    grid_file.write_text(yaml.safe_dump(spec))
    results = tmp_path / "results"
    env = {**_env(), "GRID": str(grid_file), "WORK_DIR": str(tmp_path / "work"), "RESULTS_DIR": str(results),
           "PYTHON": sys.executable}
    subprocess.run(["bash", str(REPO_ROOT / "benchmarks/gpu_evidence.sh")], check=True, env=env, cwd=REPO_ROOT)
    records = runner.read_results(results / runner.RESULTS_NAME)
    assert list(records) == [f"vanilla/ding/tiny/seed{spec['seeds'][0]}"]
    assert records[f"vanilla/ding/tiny/seed{spec['seeds'][0]}"]["num_beams"] == 4  # the preset's recipe
    assert (results / "report.md").is_file()


def test_the_shipped_grids_load():
    for path in sorted((REPO_ROOT / "benchmarks/grids").glob("*.yaml")):
        grid = load_grid(path)
        assert len(grid.seeds) >= 3, path
        for claim in grid.claims:
            grid.variant(claim["a"]), grid.variant(claim["b"])
    assert grid_module.REPO_ROOT == REPO_ROOT
