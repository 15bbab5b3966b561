"""Score a saved model on any test file: ``hf-fusion evaluate FOLDER --test_file X``.

Nothing else is needed: no training data, no experiment file. The test file is a ``.jsonl`` /
``.json`` / ``.tsv`` / ``.csv`` file with ``source`` and ``target`` columns (or language columns,
as ``hf-fusion train`` reads them), or a plain text file of sources with ``--reference_file`` a
plain text file of references, line by line. The model translates with ``training.translate``
(the same batching and decoding as ``hf-fusion translate``), and sacreBLEU scores BLEU and chrF.

Results go to an output folder of the evaluation's own (``--output_dir``, by default
``evaluations/<model>/<test file>``): ``results.json`` and ``predictions.txt``. A published model
folder is never written to: its model card and results describe the test set it was exported
with. With ``--compare OTHER_MODEL``, the other model translates the same sources and sacreBLEU's
paired bootstrap resampling tests the difference (BLEU and chrF, p-values in ``results.json``).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sacrebleu.metrics import BLEU, CHRF
from sacrebleu.significance import PairedTest

from .data import load_parallel_data
from .translate import DecodingOptions, load_translator, translate_lines

PLAIN_TEXT_SUFFIXES = (".txt", ".src", ".en", ".de")
BOOTSTRAP_SAMPLES = 1000


@dataclass
class TestSet:
    """Parallel sentences to score: ``sources[i]`` translates to ``references[i]``."""

    sources: list[str]
    references: list[str]
    name: str


def read_test_set(
    test_file: str | Path,
    reference_file: str | Path | None = None,
    source_lang: str | None = None,
    target_lang: str | None = None,
    source_column: str | None = None,
    target_column: str | None = None,
) -> TestSet:
    """Read a test set from a parallel data file, or from a source and a reference text file.

    Raises:
        FileNotFoundError: a file that does not exist (or is a folder).
        ValueError: line counts that differ, or what ``load_parallel_data`` refuses (columns...).
    """
    test_file = Path(test_file)
    for path in (test_file, reference_file):
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"{path} is not a file.")
    if reference_file is not None:
        sources = test_file.read_text(encoding="utf-8").splitlines()
        references = Path(reference_file).read_text(encoding="utf-8").splitlines()
        if len(sources) != len(references):
            raise ValueError(
                f"{test_file} has {len(sources)} lines but {reference_file} has {len(references)}; "
                "a source file and its references must have one sentence per line, in the same order."
            )
        return TestSet(sources, references, test_file.stem)
    if test_file.suffix in PLAIN_TEXT_SUFFIXES:
        raise ValueError(f"{test_file} looks like plain text: pass its references with --reference_file.")
    data = load_parallel_data(
        test_file=test_file, source_lang=source_lang, target_lang=target_lang,
        source_column=source_column, target_column=target_column, require_train=False,
    )["test"]
    return TestSet(list(data["source"]), list(data["target"]), test_file.stem)


def corpus_scores(hypotheses: list[str], references: list[str]) -> dict[str, float]:
    """sacreBLEU's corpus BLEU and chrF (default tokenisation, one reference)."""
    return {
        "bleu": BLEU().corpus_score(hypotheses, [references]).score,
        "chrf": CHRF().corpus_score(hypotheses, [references]).score,
    }


def paired_bootstrap(
    baseline: tuple[str, list[str]], other: tuple[str, list[str]], references: list[str]
) -> dict[str, dict[str, float]]:
    """sacreBLEU's paired bootstrap resampling (1,000 samples; its fixed seed, 12345, unless the
    ``SACREBLEU_SEED`` environment variable says otherwise): per metric, both systems' scores and
    the p-value of the other system's difference from the baseline."""
    test = PairedTest([baseline, other], {"bleu": BLEU(), "chrf": CHRF()}, [references], test_type="bs",
                      n_samples=BOOTSTRAP_SAMPLES)
    _, scores = test()
    results = {}
    for metric, (base, compared) in ((name, values) for name, values in scores.items() if name != "System"):
        key = "bleu" if metric.lower().startswith("bleu") else "chrf"
        results[key] = {
            "baseline": float(base.score), "other": float(compared.score), "p_value": float(compared.p_value),
        }
    return results


def default_output_dir(model: str, test: TestSet) -> Path:
    return Path("evaluations") / Path(model.rstrip("/")).name / test.name


def check_output_dir(output: Path, *models: str | None) -> None:
    """Refuse an output folder inside a model folder being evaluated.

    Raises:
        ValueError: naming both folders.
    """
    for folder in models:
        if folder is not None and Path(folder).is_dir() and output.resolve().is_relative_to(Path(folder).resolve()):
            raise ValueError(
                f"--output_dir {output} is inside the model folder {folder}; evaluation never writes into a "
                "published model folder (its card and results describe its own test set). Choose another folder."
            )


def evaluate_on_file(
    model: str,
    test: TestSet,
    output_dir: str | Path | None,
    options: DecodingOptions,
    compare: str | None = None,
    revision: str | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Translate ``test`` with ``model`` (and ``compare``), score it, write ``results.json`` and
    ``predictions.txt`` (``compare_predictions.txt``) into ``output_dir``; return the results.

    Raises:
        ValueError: if ``output_dir`` lies inside a model folder being evaluated.
    """
    output = Path(output_dir) if output_dir is not None else default_output_dir(model, test)
    check_output_dir(output, model, compare)
    translator, tokenizer = load_translator(model, revision, device)
    hypotheses = translate_lines(translator, tokenizer, test.sources, options)
    results: dict[str, Any] = {
        "model": model, "test_file": test.name, "num_sentences": len(test.sources), "num_beams": options.num_beams,
        **corpus_scores(hypotheses, test.references),
    }
    output.mkdir(parents=True, exist_ok=True)
    (output / "predictions.txt").write_text("".join(line + "\n" for line in hypotheses), encoding="utf-8")
    if compare is not None:
        other, other_tokenizer = load_translator(compare, None, device)
        other_hypotheses = translate_lines(other, other_tokenizer, test.sources, options)
        (output / "compare_predictions.txt").write_text("".join(line + "\n" for line in other_hypotheses), encoding="utf-8")
        results["compare"] = {
            "model": compare,
            **corpus_scores(other_hypotheses, test.references),
            "paired_bootstrap": paired_bootstrap((model, hypotheses), (compare, other_hypotheses), test.references),
        }
    (output / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return {**results, "output_dir": str(output)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``hf-fusion evaluate FOLDER --test_file X``."""
    parser.add_argument("--test_file", required=True, help="jsonl/json/tsv/csv with source and target, or plain sources")
    parser.add_argument("--reference_file", default=None, help="plain-text references, one per line of --test_file")
    parser.add_argument("--source_lang", default=None)
    parser.add_argument("--target_lang", default=None)
    parser.add_argument("--source_column", default=None)
    parser.add_argument("--target_column", default=None)
    parser.add_argument("--output_dir", default=None, help="default: evaluations/<model>/<test file>")
    parser.add_argument("--compare", default=None, help="a second model: paired bootstrap test of the difference")
    parser.add_argument("--num_beams", type=int, default=5)
    parser.add_argument("--max_tokens", type=int, default=4096)
    parser.add_argument("--max_length", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--revision", default=None)


def run(argv: list[str]) -> dict[str, Any]:
    """``hf-fusion evaluate MODEL --test_file X [...]``: parse, evaluate, return the results."""
    parser = argparse.ArgumentParser(prog="hf-fusion evaluate", description="Score a model on a test file.")
    parser.add_argument("model", help="model folder or Hub id")
    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.num_beams < 1 or args.max_tokens < 1:
        raise ValueError("--num_beams and --max_tokens must be at least 1.")
    if args.output_dir is not None:
        check_output_dir(Path(args.output_dir), args.model, args.compare)
    test = read_test_set(
        args.test_file, args.reference_file, args.source_lang, args.target_lang, args.source_column, args.target_column
    )
    options = DecodingOptions(num_beams=args.num_beams, max_tokens=args.max_tokens, max_length=args.max_length)
    return evaluate_on_file(args.model, test, args.output_dir, options, args.compare, args.revision, args.device)
