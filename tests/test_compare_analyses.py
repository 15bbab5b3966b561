"""``hf-fusion compare --analyses``: the analysis rows of a grid, on tiny saved models.

The per-seed effects and their intervals are checked against a from-scratch computation on the
models' own weights and losses; the cache against a second run that must compute nothing; the
grid's checks against bad entries; the report's rows against the numbers.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from hf_fusion.analysis import common as analysis_common
from training import evaluate_file
from training.compare import analyses, main
from training.compare import report as report_module
from training.compare.grid import GridError, cell_hash, load_grid
from training.compare.runner import RESULTS_NAME, write_record
from training.tokenizer import train_tokenizer

from .cli_helpers import CONFIG_DIR, REPO_ROOT
from .test_analysis import SOURCES, TARGETS, save, tiny_model

T_975_DF2 = 4.303  # t_{0.975, 2} from a printed table (3 seeds)
SEEDS = [0, 1, 2]
LEXICON = [("river", "Fluss"), ("sea", "Meer"), ("game", "Spiel"), ("house", "Haus"), ("old", "alt"),
           ("train", "Zug"), ("rain", "Regen"), ("day", "Tag"), ("Time", "Zeit")]

ANALYSES = [
    {"id": "x0_upper", "paper": "Liu", "claim": "upper layers weigh X0 most", "kind": "fusion_weights",
     "variant": "fine_grained", "settings": {"upper_layers": 2}},
    {"id": "x0_masking", "paper": "Liu", "claim": "masking X0 hurts most", "kind": "layer_masking",
     "variant": "fine_grained", "settings": {"bleu_sentences": 3}},
    {"id": "closer", "paper": "Liu", "claim": "embeddings closer", "kind": "embedding_similarity",
     "a": "surface", "b": "vanilla"},
    {"id": "faster", "paper": "D&F", "claim": "decodes faster", "kind": "decoding_speed", "a": "surface",
     "b": "vanilla", "settings": {"sentences": 2, "rounds": 1, "num_beams": 1, "max_length": 6}},
]


def _grid_file(tmp_path: Path, analyses_spec=None, **changes) -> Path:
    spec = {
        "name": "tiny", "config": str(CONFIG_DIR / "fusion_transformer_debug.yaml"), "seeds": SEEDS,
        "corpora": ["ding"], "budgets": [{"name": "s4", "overrides": {"max_steps": 4}}],
        "overrides": {"report_to": "none"}, "baseline": "vanilla",
        "variants": [
            {"name": "vanilla", "model_type": "fusion_transformer"},
            {"name": "fine_grained", "model_type": "encoder_fusion", "model_config": {"fusion_mode": "fine_grained"}},
            {"name": "surface", "model_type": "surface_fusion"},
        ],
        "analyses": ANALYSES if analyses_spec is None else analyses_spec,
        **changes,
    }
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    (tmp_path / "lexicon.tsv").write_text("".join(f"{s}\t{t}\n" for s, t in LEXICON))
    return path


# --- the grid's checks ---------------------------------------------------------------------------
@pytest.mark.parametrize("change, message", [
    ({"kind": "heatmap"}, ("analysis 'x': kind = 'heatmap' is not supported; allowed: fusion_weights, "
                           "layer_masking, embedding_similarity, decoding_speed")),
    ({"needs": "x"}, "analysis 'x': unknown field 'needs'; allowed: id, paper"),
    ({"variant": "bart"}, "analysis 'x': variant = 'bart' is not a variant; variants: vanilla, fine_grained, surface"),
    ({"metric": "bleu"}, "metric = 'bleu' is not one of kind 'fusion_weights''s; allowed: x0_margin, x0_upper_minus_lower"),
    ({"rule": "better"}, "rule = 'better' is not supported; allowed: greater, close"),
    ({"a": "vanilla"}, "kind 'fusion_weights' takes variant, not 'a'"),
    ({"variant": None, "kind": "decoding_speed"}, "kind 'decoding_speed' needs a and b"),
    ({"settings": {"upper_layers": 0}}, "settings.upper_layers = 0 must be an integer >= 1 or null"),
    ({"settings": {"rounds": 2}}, "analysis 'x' settings: unknown field 'rounds'; allowed: upper_layers"),
    ({"margin": -1}, "margin must be a number >= 0"),
    ({"id": None}, "the field 'id' is required"),
])
def test_bad_analysis_entries_are_refused_naming_the_field(tmp_path, change, message):
    entry = {"id": "x", "paper": "P", "claim": "c", "kind": "fusion_weights", "variant": "fine_grained", **change}
    entry = {key: value for key, value in entry.items() if value is not None}
    with pytest.raises(GridError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_grid(_grid_file(tmp_path, [entry]))


def test_entries_parse_with_the_kinds_defaults(tmp_path):
    grid = load_grid(_grid_file(tmp_path, [*ANALYSES, {**ANALYSES[0], "id": "x0_upper"}][:4]))
    by_id = {analysis.id: analysis for analysis in grid.analyses}
    assert by_id["x0_upper"].metric == "x0_margin" and by_id["x0_upper"].variants == ("fine_grained",)
    assert by_id["x0_masking"].settings == {"bleu_sentences": 3, "batch_size": 32}
    assert by_id["faster"].variants == ("surface", "vanilla") and by_id["faster"].rule == "greater"
    with pytest.raises(GridError, match="the id appears twice"):
        load_grid(_grid_file(tmp_path, [ANALYSES[0], ANALYSES[0]]))


def test_the_shipped_grids_test_the_four_analyses():
    for name in ("cpu_claims", "gpu_claims"):
        grid = load_grid(REPO_ROOT / "benchmarks/grids" / f"{name}.yaml")
        assert [(analysis.kind, analysis.variants) for analysis in grid.analyses] == [
            ("fusion_weights", ("fine_grained",)), ("layer_masking", ("fine_grained",)),
            ("embedding_similarity", ("surface_fusion", "vanilla")), ("decoding_speed", ("rs_transfer", "vanilla")),
        ]


# --- a tiny grid of saved models ---------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer():
    # test_analysis.py's recipe: BPE on these few sentences learns whole words, which the lexicon needs.
    return train_tokenizer((SOURCES + TARGETS) * 3, vocab_size=200, model="bpe", model_max_length=64)


@pytest.fixture
def tiny_grid(tmp_path, tokenizer, monkeypatch):
    """Three seeds of each variant saved as finished cells (``run_dir/final``), recorded under
    their real hashes; the analyses read the tiny test set instead of a corpus."""
    def sample(corpus=None, max_sentences=None, **_):
        count = len(SOURCES) if max_sentences is None else max_sentences
        return evaluate_file.TestSet(SOURCES[:count], TARGETS[:count], corpus)

    monkeypatch.setattr(analysis_common, "read_sample", sample)
    # The report's paired bootstrap reads test translations these cells do not have (tested in test_compare.py).
    monkeypatch.setattr(report_module, "bootstrap_tests", lambda *args: {})
    entries = [{**entry, "settings": {**entry.get("settings", {}), "lexicon": str(tmp_path / "lexicon.tsv")}}
               if entry["kind"] == "embedding_similarity" else entry for entry in ANALYSES]
    grid = load_grid(_grid_file(tmp_path, entries))
    results, work = tmp_path / "results", tmp_path / "work"
    models = {}
    torch.manual_seed(0)
    for cell in grid.cells():
        options = {"fine_grained": {"fusion_mode": "fine_grained", "encoder_layers": 3, "decoder_layers": 4}}
        model = tiny_model(tokenizer, cell.variant.model_type, **options.get(cell.variant.name, {}))
        run_dir = work / "cells" / cell.slug
        save(model, tokenizer, run_dir / "final")
        models[cell.key] = model
        write_record(results / RESULTS_NAME, {
            "key": cell.key, "variant": cell.variant.name, "seed": cell.seed, "corpus": cell.corpus,
            "budget": cell.budget.name, "hash": cell_hash(grid, cell), "run_dir": str(run_dir), "num_beams": 1,
            "model_type": cell.variant.model_type, "bleu": 1.0, "chrf": 10.0, "nll": 4.0, "parameters": 1000,
            "steps": 4, "flops_per_step": 1e9, "flops": 4e9, "train_seconds": 1.0, "curves": [],
        })
    return grid, results, work, models


def _run(grid, results, work) -> None:
    assert main([str(grid.path), "--analyses", "--results_dir", str(results), "--work_dir", str(work)]) == 0


def _interval(values: list[float]) -> tuple[float, float]:
    return float(np.mean(values)), T_975_DF2 * float(np.std(values, ddof=1)) / math.sqrt(len(values))


def _loss(model, tokenizer, mask: list[int] | None) -> float:
    """The model's own mean token loss over one batch of every test pair, with ``mask`` masked."""
    from hf_fusion.analysis.layer_masking import masked_encoder_layers

    batch = analysis_common.encode_sample(model, tokenizer, evaluate_file.TestSet(SOURCES, TARGETS, "t"),
                                          batch_size=len(SOURCES))[0]
    with torch.no_grad():
        if mask is None:
            return float(model(**batch).loss)
        with masked_encoder_layers(model, mask):
            return float(model(**batch).loss)


def test_effects_and_intervals_match_an_independent_computation(tiny_grid, tokenizer):
    grid, results, work, models = tiny_grid
    _run(grid, results, work)
    rows = {row.analysis.id: row for row in
            analyses.analysis_rows(grid, report_module.group_records(_records(results)), analyses.read_cache(results))}

    # Fusion weights: softmax of W over layers per dimension, averaged over dimensions (numpy);
    # top 2 of 4 decoder layers: X0 minus the largest other layer, averaged.
    margins, upper_lower = [], []
    for seed in SEEDS:
        weight = models[f"fine_grained/ding/s4/seed{seed}"].base_model.decoder.memory.weight.detach().double().numpy()
        soft = np.exp(weight) / np.exp(weight).sum(axis=1, keepdims=True)  # (decoder, N + 1, d_model)
        layers = soft.mean(axis=-1)  # (decoder, N + 1)
        margins.append(float(np.mean(layers[2:, 0] - layers[2:, 1:].max(axis=1))))
        upper_lower.append(float(layers[2:, 0].mean() - layers[:2, 0].mean()))
    row = rows["x0_upper"]
    for metric, values in (("x0_margin", margins), ("x0_upper_minus_lower", upper_lower)):
        mean, half = _interval(values)
        assert row.intervals[metric].mean == pytest.approx(mean, abs=1e-6)
        assert row.intervals[metric].half == pytest.approx(half, rel=1e-3)
    mean, half = _interval(margins)
    expected = "reproduced" if mean - half > 0 else "contradicted" if mean + half < 0 else "not significant"
    assert row.verdicts["x0_margin"] == expected

    # Layer masking: the model's own loss over one batch, each encoder layer masked in turn.
    effects = []
    for seed in SEEDS:
        model = models[f"fine_grained/ding/s4/seed{seed}"]
        base = _loss(model, tokenizer, None)
        deltas = [_loss(model, tokenizer, [layer]) - base for layer in range(4)]
        effects.append(deltas[0] - max(deltas[1:]))
        cached = row_result(rows["x0_masking"], seed)
        assert [entry["delta_loss"] for entry in cached["rows"][1:]] == pytest.approx(deltas, abs=1e-5)
        assert cached["bleu_sentences"] == 3 and cached["loss_sentences"] == len(SOURCES)
    # Without a BLEU subset the ablation's own losses are the whole split's: the same numbers.
    whole = analyses.measure_layer_masking([work / "cells" / "fine_grained__ding__s4__seed2" / "final"],
                                           {"bleu_sentences": None, "batch_size": 32}, "ding", [{}])
    assert [entry["delta_loss"] for entry in whole["rows"]] == pytest.approx(
        [entry["delta_loss"] for entry in cached["rows"]], abs=1e-6)
    assert whole["bleu_sentences"] == len(SOURCES)
    mean, half = _interval(effects)
    assert rows["x0_masking"].intervals["loss"].mean == pytest.approx(mean, abs=1e-5)
    assert rows["x0_masking"].intervals["loss"].half == pytest.approx(half, rel=1e-3)

    # Embedding similarity: cosines of the lexicon pairs that are single, different tokens (numpy).
    pairs = [(ids[0], tid[0]) for s, t in LEXICON
             for ids, tid in [(tokenizer(s, add_special_tokens=False)["input_ids"],
                               tokenizer(t, add_special_tokens=False)["input_ids"])]
             if len(ids) == 1 and len(tid) == 1 and ids != tid]
    assert len(pairs) >= 3

    def gap(model) -> float:
        embeddings = model.get_input_embeddings().weight.detach().double().numpy()
        unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
        sources, targets = sorted({s for s, _ in pairs}), sorted({t for _, t in pairs})
        cosine = unit[sources] @ unit[targets].T
        aligned = np.zeros_like(cosine, dtype=bool)
        for s, t in pairs:
            aligned[sources.index(s), targets.index(t)] = True
        return float(np.mean([cosine[sources.index(s), targets.index(t)] for s, t in pairs]) - cosine[~aligned].mean())

    differences = [gap(models[f"surface/ding/s4/seed{seed}"]) - gap(models[f"vanilla/ding/s4/seed{seed}"]) for seed in SEEDS]
    mean, half = _interval(differences)
    assert rows["closer"].intervals["gap"].mean == pytest.approx(mean, abs=1e-9)
    assert rows["closer"].intervals["gap"].half == pytest.approx(half, rel=1e-3)

    # Decoding speed: the ratio of the two models' measured rates, seed by seed.
    ratios = [row_result(rows["faster"], seed)["a"]["sentences_per_s"] / row_result(rows["faster"], seed)["b"]["sentences_per_s"]
              for seed in SEEDS]
    assert rows["faster"].intervals["sentences_per_s"].mean == pytest.approx(float(np.mean(ratios)))
    assert row_result(rows["faster"], 0)["num_beams"] == 1 and row_result(rows["faster"], 0)["a"]["sentences"] == 2
    assert row_result(rows["faster"], 0)["flops_per_step"] == [1e9, 1e9]


def test_masking_effects_compare_x0_with_the_worst_other_layer(tmp_path):
    """X0's harm minus the largest harm of another layer, for the NLL (an increase) and BLEU (a
    drop), on hand-made rows where the worst other layer differs between the two metrics."""
    grid = load_grid(_grid_file(tmp_path, [ANALYSES[1]]))
    deltas = {"X^0 (embedding)": (0.05, -0.4), "X^1": (0.08, -0.1), "X^2": (0.01, -0.9), "X^3": (-0.02, 0.3)}
    rows = [{"masked": "none", "delta_loss": 0.0, "delta_bleu": 0.0}] + [
        {"masked": name, "delta_loss": loss, "delta_bleu": bleu} for name, (loss, bleu) in deltas.items()]
    effects = analyses.layer_masking_effects(grid.analyses[0], {"rows": rows})
    others = [value for name, value in deltas.items() if name != "X^0 (embedding)"]
    assert effects["loss"] == pytest.approx(0.05 - max(loss for loss, _ in others))  # 0.05 - 0.08 (X^1)
    assert effects["bleu"] == pytest.approx(0.4 - max(-bleu for _, bleu in others))  # 0.4 - 0.9 (X^2)


def row_result(row, seed: int) -> dict:
    return row.results[seed]


def _records(results: Path) -> dict:
    from training.compare.runner import read_results

    return read_results(results / RESULTS_NAME)


@pytest.mark.parametrize("values, rule, margin, expected", [
    ([1.10, 1.20, 1.15], "greater", 0.0, "reproduced"),       # ratio interval above 1
    ([0.80, 0.85, 0.90], "greater", 0.0, "contradicted"),     # below 1
    ([0.90, 1.20, 1.05], "greater", 0.0, "not significant"),  # straddles 1
    ([0.97, 0.98, 0.99], "close", 0.05, "reproduced"),        # within 5% of b: above 0.95
    ([1.30], "greater", 0.0, "pending"),                      # one seed: no interval
])
def test_a_ratio_is_read_against_one(tmp_path, values, rule, margin, expected):
    grid = load_grid(_grid_file(tmp_path, [{**ANALYSES[3], "rule": rule, "margin": margin}]))
    results = {seed: {"a": {"sentences_per_s": value, "tokens_per_s": 1.0}, "b": {"sentences_per_s": 1.0,
                                                                                 "tokens_per_s": 1.0}}
               for seed, value in enumerate(values)}
    row = analyses.aggregate(grid.analyses[0], "ding", "s4", results)
    assert row.verdict == expected
    if len(values) > 1:
        mean, half = _interval(values)
        assert (row.intervals["sentences_per_s"].mean, row.intervals["sentences_per_s"].half) == pytest.approx((mean, half), rel=1e-3)


def test_a_second_run_computes_nothing_and_a_new_setting_or_model_recomputes(tiny_grid, monkeypatch):
    grid, results, work, _ = tiny_grid
    computed = analyses.run_analyses(grid, report_module.group_records(_records(results)), results, work, log=lambda _: None)
    assert len(computed) == 4 * len(SEEDS)
    cache = json.loads((results / analyses.ANALYSES_CACHE).read_text())
    assert sorted(cache) == sorted(computed)

    def refuse(*args):
        raise AssertionError("a cached analysis was computed again")

    monkeypatch.setattr(analyses, "MEASURE", dict.fromkeys(analyses.MEASURE, refuse))
    assert analyses.run_analyses(grid, report_module.group_records(_records(results)), results, work) == []

    # Another BLEU sample is another measurement; a re-trained cell (new hash) is another model.
    calls = []
    monkeypatch.setattr(analyses, "MEASURE", dict.fromkeys(analyses.MEASURE, lambda *args: calls.append(args) or {}))
    changed = load_grid(_grid_file(Path(grid.path).parent, [{**ANALYSES[1], "settings": {"bleu_sentences": 2}}]))
    assert len(analyses.run_analyses(changed, report_module.group_records(_records(results)), results, work)) == 3
    records = _records(results)
    records["fine_grained/ding/s4/seed1"] = {**records["fine_grained/ding/s4/seed1"], "hash": "retrained"}
    again = analyses.run_analyses(changed, report_module.group_records(records), results, work)
    assert [key.split(":")[1] for key in again] == ["retrained"]


def test_a_missing_model_is_skipped_and_named(tiny_grid):
    grid, results, work, _ = tiny_grid
    records = _records(results)
    record = records["fine_grained/ding/s4/seed0"]
    records["fine_grained/ding/s4/seed0"] = {**record, "run_dir": str(Path(record["run_dir"]).parent / "gone")}
    one = load_grid(_grid_file(Path(grid.path).parent, [ANALYSES[0]]))
    log = []
    computed = analyses.run_analyses(one, report_module.group_records(records), results, work, log.append)
    assert len(computed) == 2 and any("no exported model at" in line and "gone" in line for line in log)


def test_the_report_fills_the_rows_and_names_what_is_missing(tiny_grid, monkeypatch):
    grid, results, work, _ = tiny_grid
    _run(grid, results, work)
    report = (results / "report.md").read_text()
    rows = {row.analysis.id: row for row in
            analyses.analysis_rows(grid, report_module.group_records(_records(results)), analyses.read_cache(results))}
    for row in rows.values():
        interval = row.intervals[row.analysis.metric]
        line = next(line for line in report.splitlines() if line.startswith(f"| {row.analysis.paper} | {row.analysis.claim} |"))
        assert f": {interval.format(3)} (seeds 0, 1, 2;" in line and f"[{row.verdict}](#claims)" in line
    assert "NLL on 6 test pairs, greedy BLEU on 3" in report
    assert "![upper layers weigh X0 most: fusion weights, seed mean and std](analysis_x0_upper_ding_s4.png)" in report
    assert (results / "analysis_x0_upper_ding_s4.png").read_bytes()[:4] == b"\x89PNG"

    # A seed whose surface cell is not done, and one whose cells are done but not analysed yet.
    records = _records(results)
    del records["surface/ding/s4/seed2"]
    (results / RESULTS_NAME).write_text("".join(json.dumps(record) + "\n" for record in records.values()))
    cache = analyses.read_cache(results)
    del cache[analyses.cache_key(grid.analyses[0], [records["fine_grained/ding/s4/seed0"]])]
    (results / analyses.ANALYSES_CACHE).write_text(json.dumps(cache))
    report = report_module.write_report(grid, results).read_text()
    assert "surface seed 2 not finished" in report
    assert f"seed 0 not analysed yet (`hf-fusion compare {os.path.relpath(grid.path, REPO_ROOT)} --analyses`)" in report
    line = next(line for line in report.splitlines() if "| decodes faster |" in line)
    assert "(seeds 0, 1;" in line and "still pending: surface seed 2 not finished" in line

    # Nothing analysed: every row pending, naming why.
    (results / analyses.ANALYSES_CACHE).unlink()
    report = report_module.write_report(grid, results).read_text()
    line = next(line for line in report.splitlines() if "| embeddings closer |" in line)
    assert "pending: surface seed 2 not finished; seeds 0, 1 not analysed yet" in line and "[pending]" in line
