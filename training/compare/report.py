"""The report of a grid, written from its results file alone (never by hand).

``RESULTS_DIR/report.md`` holds, per corpus and budget:

- per variant: seeds done, parameters, mean ± 95% t interval over seeds of test BLEU, chrF and
  NLL, optimizer steps, FLOPs per step and in total, training minutes;
- per variant against the baseline: sacreBLEU's paired bootstrap resampling (1,000 samples) of
  each seed's test translations against the baseline's of the same seed, as p-values;
- the claims of the grid with their verdicts (``training/compare/stats.py``), and the analysis
  rows (``training/compare/analyses.py``) from the cached measurements of ``analyses.json``: the
  effect's interval over seeds and its verdict, the per-seed measurements, the fusion-weight
  heatmap; a row whose cells are not done or not analysed yet is pending and says which;
- learning curves (``curves_<claim>.png``): train loss, validation loss and validation BLEU
  against the step, the mean over seeds as a line and the range over seeds as a band.

With ``readme``, the claims table also replaces what lies between the README's
``<!-- claims-table:start -->`` and ``<!-- claims-table:end -->`` markers.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

from .analyses import AnalysisRow, analysis_rows, detail_section, plot_heatmap, read_cache
from .analyses import others as analysis_others
from .analyses import ours as analysis_ours
from .grid import REPO_ROOT, Grid, cell_hash
from .runner import RESULTS_NAME, read_results
from .stats import LOWER_IS_BETTER, Interval, mean_interval, verdict

REPORT_NAME = "report.md"
BOOTSTRAP_CACHE = "bootstrap.json"
README_START = "<!-- claims-table:start -->"
README_END = "<!-- claims-table:end -->"
METRICS = ("bleu", "chrf", "nll")
METRIC_NAMES = {"bleu": "BLEU", "chrf": "chrF", "nll": "NLL"}
SIGNIFICANCE = 0.05


def group_records(records: dict[str, dict[str, Any]]) -> dict[tuple[str, str, str], dict[int, dict[str, Any]]]:
    """Records by (corpus, budget, variant), then by seed."""
    groups: dict[tuple[str, str, str], dict[int, dict[str, Any]]] = defaultdict(dict)
    for record in records.values():
        groups[(record["corpus"], record["budget"], record["variant"])][record["seed"]] = record
    return groups


def paired_differences(a: dict[int, dict[str, Any]], b: dict[int, dict[str, Any]], metric: str) -> list[float]:
    """Per seed that both variants finished: how much a beats b on ``metric`` (sign flipped for
    metrics where lower is better)."""
    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
    return [sign * (a[seed][metric] - b[seed][metric]) for seed in sorted(set(a) & set(b))]


def _references(corpus: str, count: int, cache: dict[str, list[str]]) -> list[str]:
    if corpus not in cache:
        from ..data import load_parallel_data

        cache[corpus] = list(load_parallel_data(dataset_name=corpus)["test"]["target"])
    return cache[corpus][:count]


def bootstrap_tests(
    results_dir: Path, groups: dict, baseline: str, cache: dict[str, Any]
) -> dict[tuple[str, str, str], dict[int, dict[str, dict[str, float]]]]:
    """sacreBLEU's paired bootstrap of every finished cell against the baseline cell of the same
    seed, corpus and budget. Results are cached by the two cells' hashes (``bootstrap.json``), so
    a report after each new cell only tests the new pairs."""
    from ..evaluate_file import paired_bootstrap

    references: dict[str, list[str]] = {}
    tests: dict[tuple[str, str, str], dict[int, dict[str, dict[str, float]]]] = {}
    for (corpus, budget, variant), seeds in groups.items():
        base = groups.get((corpus, budget, baseline), {})
        if variant == baseline:
            continue
        for seed, record in seeds.items():
            if seed not in base:
                continue
            key = f"{base[seed]['hash']}:{record['hash']}"
            if key not in cache:
                read = [(results_dir / entry["predictions"]).read_text(encoding="utf-8").splitlines()
                        for entry in (base[seed], record)]
                cache[key] = paired_bootstrap(
                    (baseline, read[0]), (variant, read[1]), _references(corpus, len(read[0]), references)
                )
            tests.setdefault((corpus, budget, variant), {})[seed] = cache[key]
    return tests


def claim_margin(claim: dict[str, Any], b_values: list[float]) -> float:
    """The margin of a ``close`` claim in the units of its metric: ``margin`` as given, or
    ``relative_margin`` times the mean of b (so "within 1 BLEU of 27" is 4%, and a model at the
    BLEU floor is not "within 1 BLEU" by default)."""
    if "relative_margin" in claim:
        return float(claim["relative_margin"]) * abs(sum(b_values) / len(b_values)) if b_values else 0.0
    return float(claim.get("margin", 0.0))


def claim_rows(grid: Grid, groups: dict) -> list[dict[str, Any]]:
    """One row per claim and (corpus, budget): the paired difference, its interval, the verdict,
    and the same test on the other metrics (at small scale chrF and NLL resolve what BLEU cannot;
    an absolute ``margin`` is in the claim's metric's units, so then only the claim's metric)."""
    rows = []
    for corpus in grid.corpora:
        for budget in grid.budgets:
            for claim in grid.claims:
                kind, metric = claim.get("kind", "greater"), claim.get("metric", "bleu")
                a = groups.get((corpus, budget.name, claim["a"]), {})
                b = groups.get((corpus, budget.name, claim["b"]), {})
                seeds = sorted(set(a) & set(b))
                verdicts = {}
                for name in METRICS:
                    if name != metric and kind == "close" and "relative_margin" not in claim:
                        continue
                    margin = claim_margin(claim, [b[seed][name] for seed in seeds])
                    verdicts[name] = verdict(mean_interval(paired_differences(a, b, name)), kind, margin)
                rows.append({
                    "others": {name: value for name, value in verdicts.items() if name != metric},
                    "scale": scale_of(grid, claim["a"], corpus, budget.name),
                    "claim": claim, "corpus": corpus, "budget": budget.name, "metric": metric,
                    "a": mean_interval([a[seed][metric] for seed in seeds]),
                    "b": mean_interval([b[seed][metric] for seed in seeds]),
                    "difference": mean_interval(paired_differences(a, b, metric)),
                    "verdict": verdicts[metric],
                })
    return rows


def _p_values(tests: dict[int, dict[str, dict[str, float]]], metric: str) -> str:
    if not tests:
        return "–"
    values = [tests[seed][metric]["p_value"] for seed in sorted(tests)]
    significant = sum(value < SIGNIFICANCE for value in values)
    return f"{', '.join(f'{value:.3f}' for value in values)} ({significant}/{len(values)} < {SIGNIFICANCE})"


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _ours(row: dict[str, Any]) -> str:
    unit = METRIC_NAMES[row["metric"]]
    difference: Interval = row["difference"]
    if difference.n == 0:
        return "not run yet"
    return (
        f"{row['claim']['a']} − {row['claim']['b']}: {difference.format()} {unit}"
        f"{' (lower NLL counts as better)' if row['metric'] in LOWER_IS_BETTER else ''}"
        f" ({row['a'].format()} vs {row['b'].format()}; {difference.n} seed{'s' if difference.n != 1 else ''}; {row['scale']})"
    )


def claims_table(rows: list[dict[str, Any]], link: str, analyses: list[AnalysisRow] = ()) -> str:
    """The Markdown claims table (README and report): the claims, then the analysis rows."""
    lines = [
        "| paper | claim | paper's number | ours (mean ± 95% CI) | verdict | same test on the other metrics |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        claim = row["claim"]
        ours = _ours(row)
        others = "; ".join(f"{METRIC_NAMES[name]}: {value}" for name, value in row["others"].items()) or "–"
        lines.append(
            f"| {claim['paper']} | {claim['claim']} | {claim.get('paper_number', '')} | {ours} | "
            f"[{row['verdict']}]({link}) | {others} |"
        )
    for row in analyses:
        analysis = row.analysis
        lines.append(
            f"| {analysis.paper} | {analysis.claim} | {analysis.paper_number} | {analysis_ours(row)} | "
            f"[{row.verdict}]({link}) | {analysis_others(row)} |"
        )
    return "\n".join(lines)


def plot_claim_curves(groups: dict, claim: dict[str, Any], corpus: str, budget: str, path: Path) -> Path | None:
    """Learning curves of the claim's two variants, mean line and min–max band over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("loss", "train loss"), ("eval_loss", "validation loss (label-smoothed)"),
              ("eval_bleu", "validation BLEU (greedy)"))
    series: dict[str, dict[str, dict[int, list[float]]]] = {}
    for variant in (claim["a"], claim["b"]):
        for record in groups.get((corpus, budget, variant), {}).values():
            for point in record.get("curves", []):
                for key, _ in panels:
                    if key in point:
                        series.setdefault(variant, {}).setdefault(key, {}).setdefault(point["step"], []).append(point[key])
    if not series:
        return None
    figure, axes = plt.subplots(1, len(panels), figsize=(13, 3.6))
    for axis, (key, title) in zip(axes, panels):
        for variant, by_key in series.items():
            points = sorted(by_key.get(key, {}).items())
            if not points:
                continue
            steps = [step for step, _ in points]
            marker = "o" if len(steps) <= 12 else None
            line = axis.plot(steps, [_mean(values) for _, values in points], label=variant, marker=marker, markersize=3)[0]
            axis.fill_between(steps, [min(values) for _, values in points], [max(values) for _, values in points],
                              color=line.get_color(), alpha=0.2)
        axis.set_title(title)
        axis.set_xlabel("optimizer step")
        axis.grid(alpha=0.3)
    axes[0].legend()
    figure.suptitle(f"{claim['claim']} ({corpus}, {budget}; band: range over seeds)", fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path


def selected_step(record: dict[str, Any]) -> int | None:
    """The step of the exported model: with ``load_best_model_at_end`` (the shipped configs) the
    first validation with the highest BLEU, as the Trainer keeps it (a later tie does not replace
    it). A model selected early has a higher test NLL, which is part of the spread over seeds."""
    validations = [point for point in record.get("curves", []) if "eval_bleu" in point]
    if not validations:
        return None
    best = max(point["eval_bleu"] for point in validations)
    return next(point["step"] for point in validations if point["eval_bleu"] == best)


def _variant_table(grid: Grid, groups: dict, tests: dict, corpus: str, budget: str) -> list[str]:
    lines = [
        ("| variant | model type | seeds | parameters | BLEU | chrF | test NLL | steps | GFLOPs/step | "
        "PFLOPs total | train min | cell min | selected step per seed | paired bootstrap p vs baseline, BLEU (per seed) | chrF |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for variant in grid.variants:
        seeds = groups.get((corpus, budget, variant.name), {})
        if not seeds:
            lines.append(f"| {variant.name} | {variant.model_type} | 0/{len(grid.seeds)} |" + " |" * 12)
            continue
        records = [seeds[seed] for seed in sorted(seeds)]
        metrics = {metric: mean_interval([record[metric] for record in records]) for metric in METRICS}
        own_tests = tests.get((corpus, budget, variant.name), {})
        baseline_cell = "baseline" if variant.name == grid.baseline else _p_values(own_tests, "bleu")
        lines.append(
            f"| {variant.name} | {variant.model_type} | {len(records)}/{len(grid.seeds)} | "
            f"{records[0]['parameters']:,} | {metrics['bleu'].format()} | {metrics['chrf'].format()} | "
            f"{metrics['nll'].format(3)} | {records[0]['steps']} | {_mean([r['flops_per_step'] for r in records]) / 1e9:.1f} | "
            f"{_mean([r['flops'] for r in records]) / 1e15:.3f} | "
            f"{_mean([r['train_seconds'] or math.nan for r in records]) / 60:.1f} | "
            f"{_mean([r.get('cell_wall_seconds', math.nan) for r in records]) / 60:.1f} | "
            f"{', '.join(str(selected_step(r)) for r in records)} | {baseline_cell} | "
            f"{'' if variant.name == grid.baseline else _p_values(own_tests, 'chrf')} |"
        )
    return lines


def scale_of(grid: Grid, variant: str, corpus: str, budget: str) -> str:
    """The model size and step budget of a variant's cells, e.g. ``6+6 d128, 600 steps``."""
    from ..arguments import parse_experiment
    from .grid import merged_overrides, override_tokens

    budget_spec = next(entry for entry in grid.budgets if entry.name == budget)
    cell = grid.cell(variant, grid.seeds[0], corpus, budget_spec)
    experiment = parse_experiment(grid.config, override_tokens(merged_overrides(grid, cell)))
    config = experiment.model.model_config
    return (
        f"{config.get('encoder_layers')}+{config.get('decoder_layers')} d{config.get('d_model')}, "
        f"{experiment.training.max_steps} steps, {corpus}"
    )


def current_records(grid: Grid, records: dict[str, dict[str, Any]]) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """The records made under each cell's current hash, and the keys of the stale ones: a stale
    record describes a model the cell no longer trains, so it stays out of the claims until the
    cell has run again."""
    memo: dict[str, str] = {}
    current: dict[str, dict[str, Any]] = {}
    stale = []
    for cell in grid.cells():
        record = records.get(cell.key)
        if record is None:
            continue
        if record.get("hash") == cell_hash(grid, cell, memo):
            current[cell.key] = record
        else:
            stale.append(cell.key)
    return current, stale


def write_report(grid: Grid, results_dir: Path, readme: Path | None = None) -> Path:
    """Write ``report.md`` (and the curves) from the current records of the results file; update
    the README's table."""
    records, stale = current_records(grid, read_results(results_dir / RESULTS_NAME))
    groups = group_records(records)
    cache_file = results_dir / BOOTSTRAP_CACHE
    cache = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    tests = bootstrap_tests(results_dir, groups, grid.baseline, cache)
    results_dir.mkdir(parents=True, exist_ok=True)
    cache_file.write_text(json.dumps(cache, indent=1, sort_keys=True) + "\n")
    rows = claim_rows(grid, groups)
    analyses = analysis_rows(grid, groups, read_cache(results_dir))
    for row in analyses:
        row.scale = scale_of(grid, row.analysis.variants[0], row.corpus, row.budget)
    total = len(grid.cells())
    grid_file = os.path.relpath(grid.path, REPO_ROOT) if grid.path else grid.name
    lines = [
        f"# Claims grid `{grid.name}`",
        "",
        (f"Written by `hf-fusion compare {grid_file} --report_only` from `{RESULTS_NAME}`; do not edit by hand. "
        "Method: `docs/evidence.md`."),
        "",
        grid.description,
        "",
        (f"**Cells finished: {len(records)} of {total}**"
        + (f" ({len(stale)} more recorded under settings the grid has since changed, waiting to run again: "
           f"{', '.join(stale)})" if stale else "")
        + ". Intervals are 95% t intervals over seeds; a claim's "
        "verdict reads the interval of the mean difference paired by seed (reproduced only when the interval "
        "excludes the threshold). Paired bootstrap: sacreBLEU's, 1,000 resamples of the test set, each seed's "
        f"translations against the baseline `{grid.baseline}`'s of the same seed. The bootstrap covers only "
        "the sampling of the test sentences for one pair of trained models; the interval over seeds also "
        "covers the randomness of training, so a difference can be significant in every seed's bootstrap "
        "and still not over seeds."),
        "",
        "## Claims",
        "",
        claims_table(rows, "#claims", analyses),
        "",
        ("Analysis rows: measured by `hf-fusion compare GRID --analyses` on the exported models of the finished "
        "cells (`training/compare/analyses.py`), cached per cell hash in `analyses.json`; the effect per seed is "
        "tested like a claim's paired difference (details and heatmaps under [Analyses](#analyses))."),
        "",
    ]
    for corpus in grid.corpora:
        for budget in grid.budgets:
            lines += [f"## {corpus}, budget {budget.name}", "", *_variant_table(grid, groups, tests, corpus, budget.name), ""]
            for claim in grid.claims:
                name = f"curves_{claim['id']}_{corpus}_{budget.name}.png"
                if plot_claim_curves(groups, claim, corpus, budget.name, results_dir / name):
                    lines += [f"![{claim['claim']}]({name})", ""]
    if analyses:
        lines += ["## Analyses", ""]
        for row in analyses:
            name = f"analysis_{row.analysis.id}_{row.corpus}_{row.budget}.png"
            lines += detail_section(row, name if plot_heatmap(row, results_dir / name) else None)
    report = results_dir / REPORT_NAME
    report.write_text("\n".join(lines), encoding="utf-8")
    if readme is not None:
        link = os.path.relpath(report, readme.resolve().parent)
        update_readme(readme, claims_table(rows, link, analyses), f"{len(records)} of {total}", link)
    return report


def update_readme(readme: Path, table: str, progress: str, link: str) -> None:
    """Replace the text between the README's claims-table markers."""
    text = readme.read_text(encoding="utf-8")
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        raise ValueError(f"{readme} has no {README_START} ... {README_END} markers to write the claims table between.")
    body = f"\n{table}\n\nCells finished: {progress}; per-variant numbers, bootstrap tests and curves: [{link}]({link}).\n"
    readme.write_text(text[: start + len(README_START)] + body + text[end:], encoding="utf-8")
