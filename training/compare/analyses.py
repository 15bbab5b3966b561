"""The analysis rows of a grid: the papers' analyses of trained models, run on the finished cells.

A grid's ``analyses:`` entries (parsed in ``training/compare/grid.py``) name a *kind* of analysis
from ``hf_fusion.analysis`` (``docs/analyses.md``), the variants it reads and the effect its
verdict tests. ``hf-fusion compare GRID --analyses`` runs each analysis on the exported models
(``final/``) of the cells that are done, one seed at a time, and trains nothing:

- ``fusion_weights`` (one variant): the model's fusion weights (decoder layer x encoder layer,
  ``layer_weights()``). Effects: ``x0_margin``, in the upper decoder layers (the top
  ``upper_layers``, default the top half) the weight on X^0 minus the largest weight on another
  encoder layer, averaged over those layers (above 0: X^0 gets the most weight there);
  ``x0_upper_minus_lower``, the X^0 weight in the upper decoder layers minus in the others. The
  report draws the seed-mean (and std) heatmap.
- ``layer_masking`` (one variant): each encoder layer masked from the fusion in turn; the
  teacher-forced test NLL on the *whole* test split and the greedy BLEU/chrF on its first
  ``bleu_sentences`` (default all). Effects: ``loss``, X^0's NLL increase minus the largest
  increase of another layer; ``bleu``, X^0's BLEU drop minus the largest drop of another layer
  (above 0: masking X^0 hurts most).
- ``embedding_similarity`` (variants a, b of the same seed): the lexicon-aligned embedding
  similarity of both models on the word pairs usable with both vocabularies. Effects: a - b of
  ``gap`` (aligned minus unaligned cosine), ``aligned_cos`` or ``p_at_1``.
- ``decoding_speed`` (a, b of the same seed): both models decode the first ``sentences`` test
  sentences in interleaved timed rounds (same batch, beam, length, threads). Effects: the ratio
  a / b of ``sentences_per_s`` or ``tokens_per_s`` (above 1: a decodes faster).

Per seed the effect is one number; over seeds, the mean and its 95% t interval, and the verdict
of ``stats.verdict`` against the null (0 for a difference, 1 for a ratio) with the entry's
``rule`` and ``margin`` -- the same reading as a claim's paired difference.

Cumulative: each measurement is cached in ``RESULTS_DIR/analyses.json`` under the kind, the
hashes of the cells it read and the digest of its settings, so a finished analysis is never
recomputed, and one whose cell was re-trained (a new hash) or whose settings changed is.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .grid import ANALYSIS_KINDS, REPO_ROOT, Analysis, Grid
from .runner import file_lock
from .stats import Interval, mean_interval, verdict

ANALYSES_CACHE = "analyses.json"
MASKED_X0 = "X^0 (embedding)"  # hf_fusion.analysis.layer_masking.layer_name(0)


# --- which cells a row reads ------------------------------------------------------------------
def row_records(
    analysis: Analysis, groups: dict, corpus: str, budget: str
) -> dict[int, list[dict[str, Any]]]:
    """Per seed whose cells of every variant the analysis reads are done: their records, in the
    order of ``analysis.variants``."""
    per_variant = [groups.get((corpus, budget, name), {}) for name in analysis.variants]
    seeds = set.intersection(*(set(seeds) for seeds in per_variant))
    return {seed: [seeds_of[seed] for seeds_of in per_variant] for seed in sorted(seeds)}


def cache_key(analysis: Analysis, records: list[dict[str, Any]]) -> str:
    """What a measurement depends on: its kind, the cells' hashes (their trained models) and its
    settings."""
    settings = hashlib.sha256(json.dumps(analysis.settings, sort_keys=True).encode()).hexdigest()[:12]
    return f"{analysis.kind}:{':'.join(record['hash'] for record in records)}:{settings}"


def final_folder(record: dict[str, Any], work_dir: Path | None) -> Path:
    """The cell's exported model: ``run_dir/final`` as recorded, or the folder of the same name
    under ``work_dir/cells`` when the run folder was moved (results copied from another machine)."""
    recorded = Path(record["run_dir"]) / "final"
    if recorded.is_dir() or work_dir is None:
        return recorded
    return work_dir / "cells" / Path(record["run_dir"]).name / "final"


# --- the measurements (one seed each; JSON-able results) ----------------------------------------
def measure_fusion_weights(folders: list[Path], settings: dict[str, Any], corpus: str, records: list[dict]) -> dict:
    """The model's fusion weights (decoder layer x encoder layer), all the report needs: the
    effects and the seed-mean heatmap are computed from them when it is written."""
    from hf_fusion.analysis.fusion_weights import summarize_fusion_weights

    return {"weights": summarize_fusion_weights([folders[0]]).mean.tolist()}


def measure_layer_masking(folders: list[Path], settings: dict[str, Any], corpus: str, records: list[dict]) -> dict:
    """The library's ablation on the BLEU sample, plus the NLL of every setting on the whole
    test split (teacher forcing is cheap; greedy decoding is what a subset saves)."""
    from hf_fusion.analysis.common import encode_sample, load_checkpoint, read_sample, token_nll
    from hf_fusion.analysis.layer_masking import layer_masking_ablation, masked_encoder_layers

    model, tokenizer = load_checkpoint(folders[0])
    test = read_sample(corpus=corpus)
    scored = read_sample(corpus=corpus, max_sentences=settings["bleu_sentences"])
    rows = layer_masking_ablation(model, tokenizer, scored, batch_size=settings["batch_size"])
    full_loss = {row["masked"]: row["loss"] for row in rows}  # already the whole split's without a BLEU subset
    if len(scored.sources) < len(test.sources):
        batches = encode_sample(model, tokenizer, test, settings["batch_size"])
        full_loss["none"] = token_nll(model, batches)
        for layer, row in enumerate(rows[1:]):
            with masked_encoder_layers(model, [layer]):
                full_loss[row["masked"]] = token_nll(model, batches)
    return {
        "rows": [{**row, "loss": full_loss[row["masked"]], "delta_loss": full_loss[row["masked"]] - full_loss["none"]}
                 for row in rows],
        "loss_sentences": len(test.sources), "bleu_sentences": len(scored.sources),
    }


_LEXICONS: dict[str | None, list[tuple[str, str]]] = {}


def measure_embedding_similarity(folders: list[Path], settings: dict[str, Any], corpus: str,
                                 records: list[dict]) -> dict:
    """Both models' similarity measures on the same lexicon pairs (those usable with both
    vocabularies), so their difference compares like with like."""
    from hf_fusion.analysis.common import load_checkpoint
    from hf_fusion.analysis.embedding_similarity import compare_embedding_similarity, ding_lexicon, read_tsv_lexicon

    source = settings["lexicon"]
    if source not in _LEXICONS:  # the Ding dictionary takes seconds to read: once per process
        _LEXICONS[source] = read_tsv_lexicon(REPO_ROOT / source) if source else ding_lexicon()
    models = [(str(folder), *load_checkpoint(folder)) for folder in folders]
    rows, kept = compare_embedding_similarity(models, _LEXICONS[source])
    return {"a": rows[0], "b": rows[1], "pairs": len(kept)}


def measure_decoding_speed(folders: list[Path], settings: dict[str, Any], corpus: str, records: list[dict]) -> dict:
    """Both models timed in the same interleaved rounds (a slow period of a shared machine hits
    both), with the cells' training FLOPs per step, which say whether a step costs the same."""
    import torch

    from hf_fusion.analysis.common import load_checkpoint, read_sample
    from hf_fusion.analysis.decoding_speed import Decoder, compare_decoding_speed

    decoders = [Decoder(str(folder), *load_checkpoint(folder)) for folder in folders]
    sample = read_sample(corpus=corpus, max_sentences=settings["sentences"])
    beams = settings["num_beams"] or records[0].get("num_beams") or 4  # 4: the decoding analysis' default
    rows = compare_decoding_speed(decoders, sample.sources, settings["batch_size"], beams,
                                  settings["max_length"], settings["rounds"])
    return {"a": rows[0], "b": rows[1], "num_beams": beams, "threads": torch.get_num_threads(),
            "flops_per_step": [record.get("flops_per_step") for record in records]}


MEASURE: dict[str, Callable[[list[Path], dict[str, Any], str, list[dict]], dict]] = {
    "fusion_weights": measure_fusion_weights,
    "layer_masking": measure_layer_masking,
    "embedding_similarity": measure_embedding_similarity,
    "decoding_speed": measure_decoding_speed,
}


# --- per-seed effects -----------------------------------------------------------------------------
def upper_rows(analysis: Analysis, layers: int) -> int:
    """How many top decoder layers count as "upper": the setting, else the top half."""
    return min(layers, analysis.settings.get("upper_layers") or max(1, layers // 2))


def fusion_weight_effects(analysis: Analysis, result: dict) -> dict[str, float]:
    weights = result["weights"]  # (decoder_layers, encoder_layers + 1), rows sum to 1
    upper = upper_rows(analysis, len(weights))
    top, rest = weights[len(weights) - upper:], weights[: len(weights) - upper]
    x0_top = sum(row[0] for row in top) / len(top)
    return {
        "x0_margin": sum(row[0] - max(row[1:]) for row in top) / len(top),
        "x0_upper_minus_lower": x0_top - sum(row[0] for row in rest) / len(rest) if rest else math.nan,
    }


def layer_masking_effects(analysis: Analysis, result: dict) -> dict[str, float]:
    masked = {row["masked"]: row for row in result["rows"] if row["masked"] != "none"}
    x0 = masked.pop(MASKED_X0)
    return {
        "loss": x0["delta_loss"] - max(row["delta_loss"] for row in masked.values()),
        # drops are -delta_bleu: X0's drop minus the largest drop of another layer
        "bleu": min(row["delta_bleu"] for row in masked.values()) - x0["delta_bleu"],
    }


def paired_effects(analysis: Analysis, result: dict) -> dict[str, float]:
    kind = ANALYSIS_KINDS[analysis.kind]
    if kind.ratio:
        return {metric: result["a"][metric] / result["b"][metric] for metric in kind.metrics}
    return {metric: result["a"][metric] - result["b"][metric] for metric in kind.metrics}


EFFECTS: dict[str, Callable[[Analysis, dict], dict[str, float]]] = {
    "fusion_weights": fusion_weight_effects,
    "layer_masking": layer_masking_effects,
    "embedding_similarity": paired_effects,
    "decoding_speed": paired_effects,
}


def seed_detail(analysis: Analysis, result: dict) -> str:
    """One seed's measurement in words, for the report's per-seed table."""
    if analysis.kind == "fusion_weights":
        weights = result["weights"]
        upper = upper_rows(analysis, len(weights))
        return (f"X0 weight per decoder layer (bottom to top): {', '.join(f'{row[0]:.3f}' for row in weights)}; "
                f"uniform {1 / len(weights[0]):.3f}; upper = top {upper}")
    if analysis.kind == "layer_masking":
        masked = [row for row in result["rows"] if row["masked"] != "none"]
        worst = max(masked, key=lambda row: row["delta_loss"])
        deltas = ", ".join(f"{row['delta_loss']:+.4f}" for row in masked)
        x0 = next(row for row in masked if row["masked"] == MASKED_X0)
        return (f"NLL {result['rows'][0]['loss']:.3f}; Δ NLL masking X0..X{len(masked) - 1}: {deltas}; "
                f"hurts most: {worst['masked']}; Δ BLEU of X0 {x0['delta_bleu']:+.3f}")
    if analysis.kind == "embedding_similarity":
        return (f"gap {result['a']['gap']:.4f} vs {result['b']['gap']:.4f}, aligned cos {result['a']['aligned_cos']:.3f} "
                f"vs {result['b']['aligned_cos']:.3f}, P@1 {result['a']['p_at_1']:.3f} vs {result['b']['p_at_1']:.3f}; "
                f"{result['pairs']} lexicon pairs")
    return (f"{result['a']['sentences_per_s']:.2f} vs {result['b']['sentences_per_s']:.2f} sentences/s, output "
            f"{result['a']['mean_output_length']:.1f} vs {result['b']['mean_output_length']:.1f} tokens, spread "
            f"{result['a']['spread']:.2f}/{result['b']['spread']:.2f}; beam {result['num_beams']}, "
            f"{result['threads']} thread(s)")


# --- running ---------------------------------------------------------------------------------
def read_cache(results_dir: Path) -> dict[str, Any]:
    path = results_dir / ANALYSES_CACHE
    return json.loads(path.read_text()) if path.is_file() else {}


def _store(results_dir: Path, key: str, result: dict) -> None:
    """Add one measurement to the cache under its lock (re-read first: another process may have
    added others meanwhile), so a kill loses at most the measurement under way."""
    path = results_dir / ANALYSES_CACHE
    with file_lock(path.with_name(path.name + ".lock")):
        cache = read_cache(results_dir)
        cache[key] = result
        temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # replaced whole: a kill leaves no half file
        temporary.write_text(json.dumps(cache, indent=1, sort_keys=True) + "\n")
        temporary.replace(path)


def run_analyses(grid: Grid, groups: dict, results_dir: Path, work_dir: Path | None,
                 log: Callable[[str], Any] = print) -> list[str]:
    """Measure every (analysis, corpus, budget, seed) whose cells are done and whose result is not
    cached yet; returns the keys computed. A cell whose exported model cannot be found is named in
    the log and skipped (its row stays pending)."""
    cache = read_cache(results_dir)
    computed = []
    for analysis in grid.analyses:
        for corpus in grid.corpora:
            for budget in grid.budgets:
                for seed, records in row_records(analysis, groups, corpus, budget.name).items():
                    key = cache_key(analysis, records)
                    if key in cache:
                        continue
                    folders = [final_folder(record, work_dir) for record in records]
                    missing = [str(folder) for folder in folders if not (folder / "config.json").is_file()]
                    if missing:
                        log(f"{analysis.id} seed {seed}: no exported model at {', '.join(missing)}; skipped")
                        continue
                    log(f"{analysis.id} ({corpus}, {budget.name}) seed {seed}: running {analysis.kind}")
                    result = MEASURE[analysis.kind](folders, analysis.settings, corpus, records)
                    _store(results_dir, key, result)
                    computed.append(key)
    return computed


# --- aggregation --------------------------------------------------------------------------------
@dataclass
class AnalysisRow:
    """One analysis row of one corpus and budget: per-seed results and effects, the interval of
    each metric's effect over seeds, its verdict, and what the row still waits for."""

    analysis: Analysis
    corpus: str
    budget: str
    results: dict[int, dict]
    effects: dict[int, dict[str, float]]
    intervals: dict[str, Interval]
    verdicts: dict[str, str]
    waiting: str
    scale: str = ""  # the model size and budget, filled in by the report

    @property
    def verdict(self) -> str:
        return self.verdicts[self.analysis.metric]


def aggregate(analysis: Analysis, corpus: str, budget: str, results: dict[int, dict], waiting: str = "") -> AnalysisRow:
    """The effects per seed, their mean ± 95% t interval per metric, and the verdicts: the
    interval less the null (0, or 1 for a ratio) read by ``stats.verdict`` with the row's rule."""
    kind = ANALYSIS_KINDS[analysis.kind]
    effects = {seed: EFFECTS[analysis.kind](analysis, result) for seed, result in sorted(results.items())}
    intervals, verdicts = {}, {}
    for metric in kind.metrics:
        values = [effect[metric] for effect in effects.values() if not math.isnan(effect[metric])]
        intervals[metric] = interval = mean_interval(values)
        verdicts[metric] = verdict(Interval(interval.mean - kind.null, interval.half, interval.n),
                                   analysis.rule, analysis.margin)
    return AnalysisRow(analysis, corpus, budget, results, effects, intervals, verdicts, waiting)


def analysis_rows(grid: Grid, groups: dict, cache: dict[str, Any]) -> list[AnalysisRow]:
    """One row per analysis and (corpus, budget), from the cached measurements of the cells that
    are done; ``waiting`` names the seeds whose cells are not done or not analysed yet."""
    command = os.path.relpath(grid.path, REPO_ROOT) if grid.path else "GRID"
    rows = []
    for analysis in grid.analyses:
        for corpus in grid.corpora:
            for budget in grid.budgets:
                done = row_records(analysis, groups, corpus, budget.name)
                results = {seed: cache[cache_key(analysis, records)] for seed, records in done.items()
                           if cache_key(analysis, records) in cache}
                unfinished = {
                    name: [seed for seed in grid.seeds if seed not in groups.get((corpus, budget.name, name), {})]
                    for name in analysis.variants
                }
                waiting = [f"{name} seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))} not finished"
                           for name, seeds in unfinished.items() if seeds]
                unrun = [seed for seed in done if seed not in results]
                if unrun:
                    waiting.append(f"seed{'s' if len(unrun) > 1 else ''} {', '.join(map(str, unrun))} not analysed "
                                   f"yet (`hf-fusion compare {command} --analyses`)")
                rows.append(aggregate(analysis, corpus, budget.name, results, "; ".join(waiting)))
    return rows


METRIC_TEXT = {
    "x0_margin": "X0 weight − largest other encoder layer's, upper decoder layers",
    "x0_upper_minus_lower": "X0 weight, upper − lower decoder layers",
    "loss": "X0's Δ test NLL − largest other layer's",
    "bleu": "X0's greedy BLEU drop − largest other layer's",
    "gap": "{a} − {b}: aligned − unaligned cosine",
    "aligned_cos": "{a} − {b}: aligned cosine",
    "p_at_1": "{a} − {b}: lexicon P@1",
    "sentences_per_s": "{a} / {b}: sentences/s",
    "tokens_per_s": "{a} / {b}: generated tokens/s",
}


def metric_text(analysis: Analysis, metric: str) -> str:
    roles = dict(zip(("a", "b"), analysis.variants)) if len(analysis.variants) == 2 else {}
    return METRIC_TEXT[metric].format(**roles)


def _scope(row: AnalysisRow) -> str:
    """What the measurement covered, for the "ours" cell."""
    first = next(iter(row.results.values()))
    if row.analysis.kind == "layer_masking":
        return f"NLL on {first['loss_sentences']} test pairs, greedy BLEU on {first['bleu_sentences']}"
    if row.analysis.kind == "embedding_similarity":
        return f"{first['pairs']} lexicon pairs"
    if row.analysis.kind == "decoding_speed":
        flops = first.get("flops_per_step") or [None, None]
        same = (f"training FLOPs per step a/b {flops[0] / flops[1]:.2f}" if all(flops) else "FLOPs per step not recorded")
        return (f"{first['a']['sentences']} sentences, beam {first['num_beams']}, {first['threads']} thread(s); "
                f"{first['a']['parameters']:,} vs {first['b']['parameters']:,} parameters; {same}")
    upper = upper_rows(row.analysis, len(first["weights"]))
    return f"top {upper} of {len(first['weights'])} decoder layers"


def ours(row: AnalysisRow) -> str:
    """The "ours" cell of the claims table: the tested effect's interval, seeds and scope, or what
    the row waits for."""
    interval = row.intervals[row.analysis.metric]
    if interval.n == 0:
        return f"pending: {row.waiting or 'no result'}"
    seeds = ", ".join(str(seed) for seed in sorted(row.results))
    text = (f"{metric_text(row.analysis, row.analysis.metric)}: {interval.format(3)} "
            f"(seeds {seeds}; {_scope(row)}; {row.scale})")
    return text + (f"; still pending: {row.waiting}" if row.waiting else "")


def others(row: AnalysisRow) -> str:
    """The same test on the kind's other metrics."""
    return "; ".join(
        f"{metric_text(row.analysis, metric)}: {row.intervals[metric].format(3)} ({row.verdicts[metric]})"
        for metric in ANALYSIS_KINDS[row.analysis.kind].metrics
        if metric != row.analysis.metric and row.intervals[metric].n
    ) or "–"


def plot_heatmap(row: AnalysisRow, path: Path) -> Path | None:
    """The seed-mean and std fusion-weight heatmaps of a ``fusion_weights`` row (None for another
    kind or no result)."""
    if row.analysis.kind != "fusion_weights" or not row.results:
        return None
    import torch

    from hf_fusion.analysis.fusion_weights import FusionWeightSummary, plot_summary

    stacked = torch.tensor([result["weights"] for result in row.results.values()], dtype=torch.float32)
    std = stacked.std(dim=0) if len(stacked) > 1 else torch.zeros_like(stacked[0])
    names = [f"seed {seed}" for seed in row.results]
    return plot_summary(FusionWeightSummary(stacked, stacked.mean(dim=0), std, names), path)


def detail_section(row: AnalysisRow, image: str | None) -> list[str]:
    """The report's section of one row: the per-seed effects and measurements, and the heatmap."""
    metrics = ANALYSIS_KINDS[row.analysis.kind].metrics
    lines = [
        f"### {row.analysis.claim} (`{row.analysis.id}`, {row.corpus}, {row.budget})", "",
        f"{row.analysis.kind} of {' vs '.join(row.analysis.variants)}; verdict on "
        f"{metric_text(row.analysis, row.analysis.metric)} (rule {row.analysis.rule}"
        f"{f', margin {row.analysis.margin}' if row.analysis.margin else ''}, against "
        f"{ANALYSIS_KINDS[row.analysis.kind].null:g}): **{row.verdict}**."
        + (f" Waiting for: {row.waiting}." if row.waiting else ""), "",
    ]
    if not row.results:
        return lines
    lines += [
        "| seed | " + " | ".join(metric_text(row.analysis, metric) for metric in metrics) + " | measured |",
        "|---|" + "---|" * (len(metrics) + 1),
    ]
    for seed, effect in row.effects.items():
        values = " | ".join(f"{effect[metric]:.4f}" for metric in metrics)
        lines.append(f"| {seed} | {values} | {seed_detail(row.analysis, row.results[seed])} |")
    lines.append("| mean ± 95% CI | " + " | ".join(row.intervals[metric].format(4) for metric in metrics) + " | |")
    lines.append("")
    if image:
        lines += [f"![{row.analysis.claim}: fusion weights, seed mean and std]({image})", ""]
    return lines
