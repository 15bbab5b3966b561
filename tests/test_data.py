"""Corpora: the built-in Ding corpus (real Debian package) and user data from local files.

The Ding tests need the Debian package ``trans-de-en`` installed (``apt-get install -y
trans-de-en``) and are skipped without it (``requires_ding``). Nothing here touches the Hub: the Hub
code path of ``load_parallel_data`` is exercised through a local dataset folder, which
``datasets.load_dataset`` treats exactly like a Hub repository.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import datasets
import pytest

from tests.cli_helpers import requires_ding
from training.corpora import (
    SPLITS,
    build_default_corpus,
    corpus_statistics,
    default_cache_root,
    fetch_debian_package,
    main,
    normalize_for_dedup,
    read_ding_pairs,
    read_libreoffice_pairs,
    split_pairs,
    take_slice,
)
from training.data import load_parallel_data


@pytest.fixture(scope="module")
def corpus_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("corpora")


@pytest.fixture(scope="module")
def ding(corpus_root: Path) -> datasets.DatasetDict:
    """The full default Ding corpus, built once for this module."""
    return build_default_corpus("ding", cache_dir=corpus_root)


def _rows(dataset: datasets.Dataset) -> list[tuple[str, str]]:
    return list(zip(dataset["source"], dataset["target"]))


# ------------------------------------------------------------------------------------------------
# Built-in Ding corpus
# ------------------------------------------------------------------------------------------------


@requires_ding
def test_ding_splits_have_expected_shape(ding: datasets.DatasetDict) -> None:
    assert list(ding) == list(SPLITS)
    assert len(ding["validation"]) == 1000 and len(ding["test"]) == 1000
    # Debian 12 gives ~13k training pairs; package updates move this a little, so only a floor.
    assert len(ding["train"]) > 8000
    for split in SPLITS:
        assert ding[split].features == datasets.Features(
            {"source": datasets.Value("string"), "target": datasets.Value("string")}
        )
        assert ding[split].info.license == "GPL-2.0-or-later"


@requires_ding
def test_ding_pairs_are_clean_sentences(ding: datasets.DatasetDict) -> None:
    markup = re.compile(r"[{}\[\]|/()…]| :: |\b(?:sth|sb|etw|jdn|jdm)\.")
    for split in SPLITS:
        for source, target in _rows(ding[split]):
            for text in (source, target):
                assert len(text.split()) >= 4 and text[-1] in ".!?", text
                assert markup.search(text) is None, text
                assert text == " ".join(text.split()), text
            assert source != target
    # A known dictionary example sentence survives cleaning, English as source and German as target.
    everything = {pair for split in SPLITS for pair in _rows(ding[split])}
    assert ("Eventually the river flows into the sea.", "Der Fluss mündet schließlich ins Meer.") in everything


@requires_ding
def test_ding_splits_are_disjoint_and_deduplicated(ding: datasets.DatasetDict) -> None:
    normalised = {split: [normalize_for_dedup(source) for source in ding[split]["source"]] for split in SPLITS}
    for split in SPLITS:
        assert len(set(normalised[split])) == len(normalised[split]), f"duplicate sources in {split}"
    assert not set(normalised["train"]) & set(normalised["validation"])
    assert not set(normalised["train"]) & set(normalised["test"])
    assert not set(normalised["validation"]) & set(normalised["test"])


@requires_ding
def test_ding_build_is_deterministic_and_cached(ding: datasets.DatasetDict, corpus_root: Path) -> None:
    # Served from the cache: fast and identical.
    start = time.perf_counter()
    cached = build_default_corpus("ding", cache_dir=corpus_root)
    cached_seconds = time.perf_counter() - start
    # Rebuilt from the raw package file: identical again, and slower than the cache.
    start = time.perf_counter()
    rebuilt = build_default_corpus("ding", cache_dir=corpus_root, overwrite=True)
    rebuild_seconds = time.perf_counter() - start
    for split in SPLITS:
        assert _rows(cached[split]) == _rows(ding[split])
        assert _rows(rebuilt[split]) == _rows(ding[split])
    assert cached_seconds < rebuild_seconds
    info = json.loads((corpus_root / "ding" / "build_info.json").read_text())
    assert info["num_pairs"] == {split: len(ding[split]) for split in SPLITS}
    assert info["packages"]["trans-de-en"]


@requires_ding
def test_ding_subset_is_a_prefix_of_the_split_ranking(ding: datasets.DatasetDict, corpus_root: Path) -> None:
    """max_pairs keeps the first ranks of the same ordering (test, then validation, then train)."""
    small = build_default_corpus("ding", cache_dir=corpus_root, max_pairs=1500, validation_size=100, test_size=50)
    assert [len(small[split]) for split in SPLITS] == [1350, 100, 50]
    full_order = [pair for split in ("test", "validation", "train") for pair in _rows(ding[split])]
    small_order = [pair for split in ("test", "validation", "train") for pair in _rows(small[split])]
    assert small_order == full_order[:1500]


def test_split_pairs_dedups_before_ranking_and_honours_the_seed() -> None:
    pairs = [(f"Sentence number {i}.", f"Satz Nummer {i}.") for i in range(40)]
    # Case, punctuation and spacing variants of an existing source are duplicates: first one wins.
    noisy = pairs + [("sentence  NUMBER 3!", "Satz Nummer drei!"), ("Sentence number 3.", "Anderer Satz.")]
    splits = split_pairs(noisy, validation_size=5, test_size=5)
    assert sorted(pair for split in splits.values() for pair in split) == sorted(pairs)
    assert [len(splits[split]) for split in SPLITS] == [30, 5, 5]
    # Input order does not matter; the seed does.
    assert split_pairs(pairs[::-1], 5, 5) == split_pairs(pairs, 5, 5)
    assert split_pairs(pairs, 5, 5, seed=1)["test"] != splits["test"]
    with pytest.raises(ValueError, match=r"has 40 unique pairs, not enough for validation_size=20 \+ test_size=20"):
        split_pairs(pairs, validation_size=20, test_size=20)


@requires_ding
def test_slice_statistics_and_command(ding: datasets.DatasetDict, corpus_root: Path, capsys) -> None:
    small = take_slice(ding, n_train=40, n_eval=7)
    assert {split: len(small[split]) for split in SPLITS} == {"train": 40, "validation": 7, "test": 7}
    assert _rows(small["train"]) == _rows(ding["train"])[:40]
    stats = corpus_statistics(small)
    words = [len(source.split()) for source, _ in _rows(small["validation"])]
    assert stats["validation"]["pairs"] == 7
    assert stats["validation"]["mean_source_words"] == pytest.approx(sum(words) / 7)
    # The command prints the statistics of the cached corpus.
    main(["--name", "ding", "--cache-dir", str(corpus_root)])
    report = json.loads(capsys.readouterr().out)
    assert report["name"] == "ding"
    assert {split: report[split]["pairs"] for split in SPLITS} == {split: len(ding[split]) for split in SPLITS}


def test_ding_rejects_bad_options(corpus_root: Path) -> None:
    with pytest.raises(ValueError, match=r"name='wmt'.*allowed values: \['ding', 'libreoffice'\]"):
        build_default_corpus("wmt", cache_dir=corpus_root)
    with pytest.raises(ValueError, match="max_pairs must be a positive int"):
        build_default_corpus("ding", cache_dir=corpus_root, max_pairs=0)
    with pytest.raises(ValueError, match="validation_size must be >= 0"):
        build_default_corpus("ding", cache_dir=corpus_root, validation_size=-1)


def test_cache_root_and_missing_apt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_FUSION_DATA", str(tmp_path / "corpora"))
    assert default_cache_root() == tmp_path / "corpora"
    monkeypatch.delenv("HF_FUSION_DATA")
    assert default_cache_root() == Path.home() / ".cache" / "hf_fusion" / "corpora"
    # Without Debian tools the error says what to use instead.
    monkeypatch.setattr("training.corpora.shutil.which", lambda name: None)
    with pytest.raises(RuntimeError, match=r"apt-get/dpkg-deb are not available.*load_parallel_data\(train_file="):
        fetch_debian_package("trans-de-en", "usr/share/no/such/file", tmp_path)


def test_read_ding_pairs_cleaning_rules(tmp_path: Path) -> None:
    raw = tmp_path / "de-en"
    raw.write_text(
        "# Version :: test\n"
        # Sub-entries pair up by position; {tags} and [labels] go; the first ; alternative wins.
        "Haus {n} | Das Haus ist sehr alt.; Das Gebäude ist alt. [ugs.] :: house | The house is very old.; "
        "The building is old.\n"
        # Different numbers of sub-entries: the line cannot be aligned and is skipped.
        "Baum {m} | Der Baum ist sehr groß. | Bäume :: tree | The tree is very tall.\n"
        # Dictionary patterns: placeholders, optional parts, slashes, too short, no final stop.
        "Das hilft etw. sehr viel. :: That helps sth. a lot.\n"
        "Ich nehme (das) an, dass es stimmt. :: I suppose (that) it is true.\n"
        "Ich möchte lesen/schreiben gehen. :: I want to read/write now.\n"
        "Geh weg! :: Go away!\n"
        "etwas tun wollen :: wanting to do something\n"
        "Er kommt morgen früh an. :: He arrives tomorrow morning. /HATM/\n",
        encoding="utf-8",
    )
    assert list(read_ding_pairs(raw)) == [
        ("The house is very old.", "Das Haus ist sehr alt."),
        ("He arrives tomorrow morning.", "Er kommt morgen früh an."),
    ]


_HELP_PAGE = """<!DOCTYPE html>
<html lang="{lang}"><head><meta charset="utf-8"><title>t</title></head><body>
<div id="DisplayArea">
<h1 id="hd_id1" dir="auto">{title}</h1>
<p id="par_id2" class="paragraph"><a name="x"></a><span class="avis">{sentence}<br></span></p>
<p id="par_id3">{undo} <span id="swlnsys1" class="switchinline">\
<span hidden="true" id="MACsys1" class="MAC">{mac}</span>\
<span hidden="true" id="defaultsys1">{ctrl}</span></span>+Z.</p>
<p id="par_id4">Writer</p>
<p id="par_id5"></p>
{extra}
<div class="embedded"><p id="par_id2">{sentence} (embedded copy)</p></div>
</div></body></html>
"""


def test_read_libreoffice_pairs_aligns_by_page_and_paragraph_id(tmp_path: Path) -> None:
    english, german = tmp_path / "en-US" / "text", tmp_path / "de" / "text"
    for root, values in (
        (english, dict(lang="en-US", title="Load/Save options", sentence="Specifies general settings.",
                       undo="Undo with", mac="Command", ctrl="Ctrl", extra='<p id="par_id9">Only English.</p>')),
        (german, dict(lang="de", title="Laden/Speichern", sentence="Legt allgemeine Einstellungen fest.",
                      undo="Rückgängig mit", mac="Befehl", ctrl="Strg", extra="")),
    ):
        (root / "shared").mkdir(parents=True)
        (root / "shared" / "page.html").write_text(_HELP_PAGE.format(**values), encoding="utf-8")
    # A page without a German counterpart contributes nothing.
    (english / "shared" / "only_en.html").write_text(
        _HELP_PAGE.format(lang="en-US", title="Lonely", sentence="No partner.", undo="", mac="", ctrl="", extra=""),
        encoding="utf-8",
    )
    assert list(read_libreoffice_pairs(english, german)) == [
        ("Load/Save options", "Laden/Speichern"),
        ("Specifies general settings.", "Legt allgemeine Einstellungen fest."),
        ("Undo with Ctrl+Z.", "Rückgängig mit Strg+Z."),
    ]


# ------------------------------------------------------------------------------------------------
# load_parallel_data: local files and the Hub code path
# ------------------------------------------------------------------------------------------------

PAIRS = [
    ("He said \"hello\", then left.", "Er sagte „hallo“ und ging."),
    ("NA is not a number here.", "NA ist hier keine Zahl."),
    ("The cat sleeps, as usual.", "Die Katze schläft wie immer."),
]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def test_load_jsonl_with_source_target_columns(tmp_path: Path) -> None:
    rows = [{"source": source, "target": target, "id": i} for i, (source, target) in enumerate(PAIRS)]
    train = _write_jsonl(tmp_path / "train.jsonl", rows)
    valid = _write_jsonl(tmp_path / "valid.jsonl", [{"source": "A b c.", "target": "D e f."}])
    data = load_parallel_data(train_file=train, validation_file=valid)
    assert list(data) == ["train", "validation"]
    assert _rows(data["train"]) == PAIRS
    assert data["train"].column_names == ["source", "target"]
    assert _rows(data["validation"]) == [("A b c.", "D e f.")]


def test_load_tsv_keeps_quotes_and_na(tmp_path: Path) -> None:
    train = tmp_path / "train.tsv"
    train.write_text("en\tde\n" + "".join(f"{s}\t{t}\n" for s, t in PAIRS), encoding="utf-8")
    data = load_parallel_data(train_file=train, source_lang="en", target_lang="de")
    assert _rows(data["train"]) == PAIRS


def test_load_csv_with_explicit_columns(tmp_path: Path) -> None:
    import csv

    train = tmp_path / "train.csv"
    with open(train, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["english", "german", "score"])
        writer.writerows([(s, t, 1) for s, t in PAIRS] + [("", "leer", 0)])
    data = load_parallel_data(train_file=train, test_file=train, source_column="english", target_column="german")
    # The row with an empty source is dropped.
    assert _rows(data["train"]) == PAIRS
    assert _rows(data["test"]) == PAIRS


def test_hub_code_path_with_translation_column(tmp_path: Path) -> None:
    """A folder of split files loads like a Hub repo id; rows hold a wmt16-style translation dict."""
    folder = tmp_path / "wmt_like"
    folder.mkdir()
    _write_jsonl(folder / "train.jsonl", [{"translation": {"en": s, "de": t}} for s, t in PAIRS])
    _write_jsonl(folder / "test.jsonl", [{"translation": {"en": t, "de": s}} for s, t in PAIRS[:1]])
    data = load_parallel_data(dataset_name=str(folder), source_lang="en", target_lang="de")
    assert sorted(data) == ["test", "train"]
    assert _rows(data["train"]) == PAIRS
    # Reversing the direction is a matter of the language keys.
    reverse = load_parallel_data(dataset_name=str(folder), source_lang="de", target_lang="en")
    assert _rows(reverse["train"]) == [(t, s) for s, t in PAIRS]
    wrong_key = r"target_lang='ro' is not a key of the 'translation' column; keys: \['en', 'de'\]"
    with pytest.raises(ValueError, match=wrong_key):
        load_parallel_data(dataset_name=str(folder), source_lang="en", target_lang="ro")
    with pytest.raises(ValueError, match="pass source_lang and target_lang"):
        load_parallel_data(dataset_name=str(folder))


def test_load_parallel_data_error_messages(tmp_path: Path) -> None:
    good = _write_jsonl(tmp_path / "train.jsonl", [{"en": s, "de": t} for s, t in PAIRS])
    missing_column = r"source_column='english' is not a column of split 'train'; columns: \['en', 'de'"
    with pytest.raises(ValueError, match=missing_column):
        load_parallel_data(train_file=good, source_column="english", target_column="de")
    with pytest.raises(ValueError, match=r"Cannot find source and target text in split 'train'; columns: \['en', 'de'"):
        load_parallel_data(train_file=good)
    with pytest.raises(ValueError, match="Pass both source_column and target_column"):
        load_parallel_data(train_file=good, source_column="en")

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"validation_file=.*empty.jsonl' is empty"):
        load_parallel_data(train_file=good, validation_file=empty)
    header_only = tmp_path / "header.csv"
    header_only.write_text("source,target\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"train_file=.*header.csv' has no data rows"):
        load_parallel_data(train_file=header_only)
    blank_rows = tmp_path / "blank_rows.csv"
    blank_rows.write_text("source,target\n,x\ny,\n", encoding="utf-8")
    with pytest.raises(ValueError, match="Split 'train' has no rows with both source and target text"):
        load_parallel_data(train_file=blank_rows)

    with pytest.raises(ValueError, match="train_file is required; got only \\['validation'\\]"):
        load_parallel_data(validation_file=good)
    only_validation = tmp_path / "no_train"
    only_validation.mkdir()
    _write_jsonl(only_validation / "validation.jsonl", [{"source": "A b c.", "target": "D e f."}])
    with pytest.raises(ValueError, match=r"has no 'train' split; splits: \['validation'\]"):
        load_parallel_data(dataset_name=str(only_validation))

    with pytest.raises(ValueError, match="Pass dataset_name .* or train_file"):
        load_parallel_data()
    with pytest.raises(ValueError, match="not both"):
        load_parallel_data(dataset_name="wmt16", train_file=good)
    with pytest.raises(ValueError, match=r"unsupported extension '.txt'"):
        load_parallel_data(train_file=tmp_path / "train.txt")
    with pytest.raises(ValueError, match="does not exist"):
        load_parallel_data(train_file=tmp_path / "missing.jsonl")
    tsv = tmp_path / "valid.tsv"
    tsv.write_text("en\tde\nA b c.\tD e f.\n", encoding="utf-8")
    with pytest.raises(ValueError, match="same format"):
        load_parallel_data(train_file=good, validation_file=tsv, source_lang="en", target_lang="de")


@requires_ding
def test_builtin_corpus_name_goes_through_load_parallel_data(ding: datasets.DatasetDict, corpus_root: Path) -> None:
    data = load_parallel_data(dataset_name="ding", cache_dir=corpus_root)
    for split in SPLITS:
        assert _rows(data[split]) == _rows(ding[split])


@requires_ding
def test_joint_tokenizer_on_real_ding_text(ding: datasets.DatasetDict) -> None:
    """A joint vocabulary trained on both sides of train covers held-out text of both languages."""
    import itertools

    from training.tokenizer import train_tokenizer

    train = take_slice(ding, n_train=4000, n_eval=500)["train"]
    tokenizer = train_tokenizer(itertools.chain(train["source"], train["target"]), vocab_size=1500, model="bpe")
    assert len(tokenizer) == 1500
    held_out = list(ding["validation"]["source"][:500]) + list(ding["validation"]["target"][:500])
    encoded = tokenizer(held_out)["input_ids"]
    pieces = sum(len(ids) for ids in encoded)
    unknown = sum(ids.count(tokenizer.unk_token_id) for ids in encoded)
    assert unknown / pieces < 1e-3
    lossless = sum(tokenizer.decode(ids, skip_special_tokens=True) == text for ids, text in zip(encoded, held_out))
    assert lossless / len(held_out) > 0.99
