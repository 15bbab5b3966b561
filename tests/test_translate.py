"""``hf-fusion translate``: round trip against ``generate``, order under length batching, empty and
over-long lines, standard input and output, a closed pipe, and a process without hf_fusion."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO_ROOT, build_tiny, run_in_clean_process
from training.tokenizer import train_tokenizer
from training.translate import DecodingOptions, length_batches, load_translator, translate_lines

SENTENCES = [
    "Eventually the river flows into the sea.",
    "Der Fluss mündet schließlich ins Meer.",
    "The game eats up too much memory.",
    "Das Spiel frisst zu viel Speicher.",
    "She waited for the train in the rain.",
    "Sie wartete im Regen auf den Zug.",
]
# Lines of different lengths in an order length-bucketing changes, with an empty line.
LINES = ["the sea", "", "She waited for the train in the rain and the game ate memory.", "river", "The game eats up."]


def save_translator(path: Path, model_type: str = "fusion_transformer") -> Path:
    """A tiny model of ``model_type`` with a real (trained) tokenizer, saved as a folder."""
    tokenizer = train_tokenizer(SENTENCES * 3, vocab_size=60, model_max_length=64)
    torch.manual_seed(0)
    model = build_tiny(
        model_type, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.eos_token_id, max_position_embeddings=64,
    ).eval()
    with torch.no_grad():  # spread the weights so that different sources give different outputs
        for parameter in model.parameters():
            if parameter.dim() >= 2:
                parameter.normal_(0.0, 1.0)
    model.generation_config.max_length = 12
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_translator(tmp_path_factory.mktemp("translator") / "model")


def reference(model, tokenizer, line: str, **kwargs) -> str:
    """One line through ``generate`` alone (no batching, no padding)."""
    if not line:
        return ""
    inputs = tokenizer([line], return_tensors="pt")
    with torch.no_grad():
        return tokenizer.decode(model.generate(**inputs, **kwargs)[0], skip_special_tokens=True).strip()


def test_translations_equal_generate_line_by_line_in_input_order(folder: Path) -> None:
    model, tokenizer = load_translator(str(folder))
    options = DecodingOptions(num_beams=1, max_tokens=20)  # forces several batches
    got = translate_lines(model, tokenizer, LINES, options)
    expected = [reference(model, tokenizer, line, num_beams=1, do_sample=False) for line in LINES]
    assert got == expected
    assert got[1] == "" and len(set(got) - {""}) > 1  # empty stays empty; outputs differ, so order is checked


@pytest.mark.parametrize("model_type", ["encoder_fusion", "surface_fusion", "recurrent_stacking", "depthwise_lstm"])
def test_every_family_translates_like_generate(model_type: str, tmp_path: Path) -> None:
    model, tokenizer = load_translator(str(save_translator(tmp_path / model_type, model_type)))
    got = translate_lines(model, tokenizer, LINES, DecodingOptions(num_beams=2, max_tokens=20))
    assert got == [reference(model, tokenizer, line, num_beams=2, do_sample=False) for line in LINES]


def test_beam_search_translations_equal_generate(folder: Path) -> None:
    model, tokenizer = load_translator(str(folder))
    got = translate_lines(model, tokenizer, LINES, DecodingOptions(num_beams=3, length_penalty=1.0, max_tokens=64))
    expected = [reference(model, tokenizer, line, num_beams=3, length_penalty=1.0, do_sample=False) for line in LINES]
    assert got == expected


def test_length_batches_respect_the_budget_and_cover_every_line_once() -> None:
    lengths = [5, 0, 17, 3, 9, 9, 40, 1]
    batches = list(length_batches(lengths, max_tokens=20))
    flat = [index for batch in batches for index in batch]
    assert sorted(flat) == [0, 2, 3, 4, 5, 6, 7]  # the empty line is not decoded
    for batch in batches:
        assert len(batch) == 1 or len(batch) * max(lengths[i] for i in batch) <= 20
    assert [lengths[i] for i in flat] == sorted((n for n in lengths if n), reverse=True)


def test_an_overlong_line_is_truncated_with_a_warning_naming_it(folder: Path, caplog) -> None:
    model, tokenizer = load_translator(str(folder))
    long_line = " ".join(["river sea game"] * 40)
    with caplog.at_level(logging.WARNING, logger="training"):
        got = translate_lines(model, tokenizer, ["the sea", long_line], DecodingOptions(num_beams=1))
    assert len(got) == 2 and got[1]
    assert any("line 2 has" in record.getMessage() and "truncated" in record.getMessage() for record in caplog.records)


def _cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "training.cli", "translate", *args]
    return subprocess.run(command, input=stdin, capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)


@pytest.mark.slow
def test_standard_input_to_standard_output_and_files(folder: Path, tmp_path: Path) -> None:
    model, tokenizer = load_translator(str(folder))
    expected = [reference(model, tokenizer, line, num_beams=2, do_sample=False) for line in LINES]
    result = _cli(str(folder), "--num_beams", "2", stdin="\n".join(LINES) + "\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:-1] == expected
    source = tmp_path / "in.txt"
    source.write_text("\n".join(LINES) + "\n", encoding="utf-8")
    output = tmp_path / "out.txt"
    result = _cli(str(folder), "--num_beams", "2", "--input", str(source), "--output", str(output))
    assert result.returncode == 0, result.stderr
    assert output.read_text(encoding="utf-8").split("\n")[:-1] == expected
    assert "translating" in result.stderr  # the progress bar, on standard error when reading a file


@pytest.mark.slow
def test_a_closed_pipe_ends_quietly(folder: Path, tmp_path: Path) -> None:
    source = tmp_path / "in.txt"
    source.write_text("the sea\n" * 2000, encoding="utf-8")
    command = f"{sys.executable} -m training.cli translate {folder} --num_beams 1 --input {source} | head -1"
    result = subprocess.run(["bash", "-o", "pipefail", "-c", command], capture_output=True, text=True, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr


def test_bad_options_are_one_line_errors(folder: Path, tmp_path: Path) -> None:
    from training.cli import main

    assert main(["translate", str(folder), "--input", str(tmp_path / "missing.txt")]) == 2
    assert main(["translate", str(folder), "--max_tokens", "0"]) == 2


@pytest.mark.slow
def test_translates_where_hf_fusion_is_not_installed(folder: Path, tmp_path: Path) -> None:
    """translate.py imports only transformers: in a process that cannot import hf_fusion (nor the
    training package) it loads the folder's own code and gives the same translations."""
    model, tokenizer = load_translator(str(folder))
    expected = translate_lines(model, tokenizer, LINES, DecodingOptions(num_beams=2))
    script = REPO_ROOT / "training" / "translate.py"
    run_in_clean_process(
        f"""
        import importlib.util, json, sys
        spec = importlib.util.spec_from_file_location("translate", {str(script)!r})
        translate = importlib.util.module_from_spec(spec)
        sys.modules["translate"] = translate
        spec.loader.exec_module(translate)
        def importable(name):
            try:
                importlib.import_module(name)
            except ImportError:
                return False
            return True
        assert not importable("hf_fusion"), "hf_fusion must not be importable here"
        model, tokenizer = translate.load_translator({str(folder)!r})
        assert "hf_fusion" not in type(model).__module__
        lines = {LINES!r}
        out = translate.translate_lines(model, tokenizer, lines, translate.DecodingOptions(num_beams=2))
        json.dump(out, open("out.json", "w"))
        """,
        tmp_path,
    )
    import json

    assert json.loads((tmp_path / "out.json").read_text()) == expected


# --- hf-fusion evaluate MODEL --test_file X ---------------------------------------------------


def _write_jsonl(path: Path, pairs: list[tuple[str, str]]) -> Path:
    import json

    path.write_text("".join(json.dumps({"source": s, "target": t}) + "\n" for s, t in pairs), encoding="utf-8")
    return path


PAIRS = list(zip(SENTENCES[0::2], SENTENCES[1::2]))


def test_evaluate_on_a_test_file_alone_writes_its_own_folder(folder: Path, tmp_path: Path) -> None:
    import sacrebleu

    from training.evaluate_file import run

    before = sorted(p.name for p in folder.iterdir())
    test_file = _write_jsonl(tmp_path / "other.jsonl", PAIRS)
    results = run([str(folder), "--test_file", str(test_file), "--num_beams", "1", "--output_dir", str(tmp_path / "eval")])
    assert sorted(p.name for p in folder.iterdir()) == before  # the model folder is untouched
    predictions = (tmp_path / "eval" / "predictions.txt").read_text(encoding="utf-8").splitlines()
    references = [target for _, target in PAIRS]
    assert len(predictions) == len(PAIRS)
    assert results["bleu"] == pytest.approx(sacrebleu.corpus_bleu(predictions, [references]).score)
    assert results["chrf"] == pytest.approx(sacrebleu.corpus_chrf(predictions, [references]).score)
    model, tokenizer = load_translator(str(folder))
    assert predictions == translate_lines(model, tokenizer, [s for s, _ in PAIRS], DecodingOptions(num_beams=1))


def test_evaluate_plain_text_sources_with_a_reference_file(folder: Path, tmp_path: Path) -> None:
    from training.evaluate_file import run

    sources = tmp_path / "test.txt"
    sources.write_text("".join(s + "\n" for s, _ in PAIRS), encoding="utf-8")
    references = tmp_path / "ref.txt"
    references.write_text("".join(t + "\n" for _, t in PAIRS), encoding="utf-8")
    results = run([str(folder), "--test_file", str(sources), "--reference_file", str(references),
                   "--num_beams", "1", "--output_dir", str(tmp_path / "eval")])
    assert results["num_sentences"] == len(PAIRS)
    references.write_text("only one line\n", encoding="utf-8")
    with pytest.raises(ValueError, match="has 3 lines but .* has 1"):
        run([str(folder), "--test_file", str(sources), "--reference_file", str(references)])


def test_evaluate_refuses_to_write_into_the_model_folder(folder: Path, tmp_path: Path) -> None:
    from training.evaluate_file import run

    test_file = _write_jsonl(tmp_path / "t.jsonl", PAIRS)
    with pytest.raises(ValueError, match="never writes into a published model folder"):
        run([str(folder), "--test_file", str(test_file), "--output_dir", str(folder / "eval")])


def test_paired_bootstrap_separates_a_real_difference_from_none() -> None:
    from training.evaluate_file import paired_bootstrap

    references = [f"sentence number {i} is about the river and the sea" for i in range(40)]
    # One word changed in one sentence of 40: a difference chance explains.
    nearly = list(references)
    nearly[7] = nearly[7].replace("river", "lake")
    close = paired_bootstrap(("a", references), ("b", nearly), references)
    assert close["bleu"]["p_value"] > 0.05 and close["bleu"]["baseline"] > close["bleu"]["other"]
    worse = [" ".join(reference.split()[:3]) for reference in references]
    different = paired_bootstrap(("a", references), ("b", worse), references)
    assert different["bleu"]["p_value"] < 0.01 and different["chrf"]["p_value"] < 0.01


@pytest.mark.slow
def test_evaluate_compare_reports_both_models(folder: Path, tmp_path: Path) -> None:
    from training.evaluate_file import run

    test_file = _write_jsonl(tmp_path / "t.jsonl", PAIRS)
    results = run([str(folder), "--test_file", str(test_file), "--num_beams", "1", "--compare", str(folder),
                   "--output_dir", str(tmp_path / "eval")])
    assert results["compare"]["bleu"] == results["bleu"]  # the same model twice: the same translations
    # sacreBLEU counts only resampled differences larger than the observed one, so a system compared
    # with itself gets the smallest p-value, 1 / (samples + 1): the test is for different systems.
    assert 0 < results["compare"]["paired_bootstrap"]["bleu"]["p_value"] <= 1
    assert (tmp_path / "eval" / "compare_predictions.txt").is_file()


def test_hf_fusion_evaluate_with_a_test_file_needs_nothing_else(folder: Path, tmp_path: Path, capsys) -> None:
    from training.cli import main

    test_file = _write_jsonl(tmp_path / "t.jsonl", PAIRS)
    assert main(["evaluate", str(folder), "--test_file", str(test_file), "--num_beams", "1",
                 "--output_dir", str(tmp_path / "eval")]) == 0
    out = capsys.readouterr().out
    assert "BLEU" in out and "chrF" in out and str(tmp_path / "eval") in out
    assert main(["evaluate", str(folder), "--test_file", str(tmp_path / "missing.jsonl")]) == 2
