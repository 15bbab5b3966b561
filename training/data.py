"""Parallel text for training and evaluating hf_fusion models: the one loading entry point.

:func:`load_parallel_data` returns a :class:`datasets.DatasetDict` whose splits have exactly two
string columns, ``source`` and ``target``, from any of:

* a built-in corpus name (``"ding"``, ``"libreoffice"``): built from a Debian package by
  :mod:`training.corpora`;
* a Hub dataset (a ``translation`` dict column as in ``wmt16``, or plain columns);
* local jsonl/json/tsv/csv files.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
from pathlib import Path

import datasets

from .corpora import BUILTIN_CORPORA, PAIR_FEATURES, build_default_corpus
from .errors import DataError

logger = logging.getLogger(__name__)

# File suffix -> (datasets builder, builder options). TSV is read without quote handling
# (sentences contain quotes) and no cell is turned into NaN ("NA" and "null" are words).
_FILE_BUILDERS: dict[str, tuple[str, dict]] = {
    ".jsonl": ("json", {}),
    ".json": ("json", {}),
    ".csv": ("csv", {"keep_default_na": False, "na_filter": False}),
    ".tsv": ("csv", {"delimiter": "\t", "quoting": 3, "keep_default_na": False, "na_filter": False}),
}


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    seen: dict = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen[key] = value
    return seen


class _DuplicateKey(Exception):
    """A JSON object with a key twice (``json`` keeps the last silently; a data file must not)."""


_UTF8_FIX = "re-save it as UTF-8 (e.g. `iconv -f latin1 -t utf-8 FILE > FILE.utf8`)"


def _check_json_text(where: str, text: str) -> None:
    """One JSON object: parses, no key twice."""
    try:
        value = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except _DuplicateKey as duplicate:
        raise DataError(f"{where} has the key {duplicate.args[0]!r} twice; keep one of them.") from None
    except json.JSONDecodeError as error:
        raise DataError(
            f"{where} is not valid JSON ({error.msg} at column {error.colno}; a truncated line?): each line must be "
            'one complete object like {"source": "...", "target": "..."}.'
        ) from None
    if not isinstance(value, (dict, list)):
        raise DataError(f"{where} is not a JSON object: each line must be an object like {{\"source\": ..., \"target\": ...}}.")


def _check_file(split: str, path: Path, suffix: str) -> None:
    """Read the whole file once and refuse what the loader would choke on, naming the file, the
    line and the fix: a folder, no text, bytes that are not UTF-8, a line that is not one complete
    JSON object (or has a key twice), a TSV/CSV row with more fields than the header."""
    name = f"{split}_file={str(path)!r}"
    if path.is_dir():
        raise DataError(f"{name} is a directory; give one {suffix} file inside it.")
    if not path.is_file():
        raise DataError(f"{name} does not exist.")
    whole_json = None
    header_fields = None
    blank = True
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise DataError(
                    f"{name} line {number}: byte 0x{raw[error.start]:02x} at column {error.start + 1} is not UTF-8; "
                    f"{_UTF8_FIX}."
                ) from None
            if not line.strip():
                continue
            if blank and suffix == ".json" and line.lstrip().startswith("["):
                whole_json = True  # one JSON document (an array of rows), checked as a whole below
            blank = False
            if suffix in (".jsonl", ".json") and not whole_json:
                _check_json_text(f"{name} line {number}", line.strip())
            elif suffix in (".tsv", ".csv"):
                fields = len(line.rstrip("\r\n").split("\t")) if suffix == ".tsv" else len(next(csv.reader([line]), []))
                if header_fields is None:
                    header_fields = fields
                elif fields > header_fields:
                    separator = "tab-separated" if suffix == ".tsv" else "comma-separated"
                    raise DataError(
                        f"{name} line {number} has {fields} {separator} fields but the header has {header_fields}: "
                        f"remove the extra {'tab' if suffix == '.tsv' else 'comma (or quote the cell)'} in that row."
                    )
    if blank:
        raise DataError(f"{name} is empty.")
    if whole_json:
        _check_json_text(name, path.read_text(encoding="utf-8"))


def _file_builder(files: dict[str, str]) -> tuple[str, dict]:
    suffixes = set()
    for split, path in files.items():
        suffix = Path(path).suffix.lower()
        if suffix not in _FILE_BUILDERS:
            raise DataError(
                f"{split}_file={path!r} has an unsupported extension {suffix!r}; allowed: {sorted(_FILE_BUILDERS)}."
            )
        _check_file(split, Path(path), suffix)
        suffixes.add(_FILE_BUILDERS[suffix][0] + str(_FILE_BUILDERS[suffix][1]))
    if len(suffixes) > 1:
        raise DataError(f"All data files must have the same format; got {files}.")
    return _FILE_BUILDERS[Path(next(iter(files.values()))).suffix.lower()]


def _translation_keys(dataset: datasets.Dataset) -> list[str]:
    """Language keys of a ``translation`` column (a ``Translation`` feature or a plain struct)."""
    feature = dataset.features["translation"]
    if isinstance(feature, datasets.Translation):
        return list(feature.languages)
    if isinstance(feature, dict):
        return list(feature)
    raise ValueError(f"Column 'translation' must hold {{language: text}} dicts, found feature {feature}.")


def _as_text(value: object) -> str:
    """Cell -> text; a missing cell becomes "" (dropped later), a number its string."""
    return "" if value is None else str(value)


def _to_source_target(
    dataset: datasets.Dataset,
    split: str,
    source_lang: str | None,
    target_lang: str | None,
    source_column: str | None,
    target_column: str | None,
) -> datasets.Dataset:
    """Select the source and target text of one split into columns ``source`` and ``target``.

    Resolution order: explicit ``source_column``/``target_column``; a ``translation`` dict column
    indexed by ``source_lang``/``target_lang`` (wmt16 style); existing ``source``/``target``
    columns; columns named after the languages (``en``/``de``).
    """
    columns = dataset.column_names
    hint = " (the first row of a csv/tsv file is its header)"
    if source_column is not None or target_column is not None:
        if source_column is None or target_column is None:
            raise ValueError("Pass both source_column and target_column, or neither.")
        for field, column in (("source_column", source_column), ("target_column", target_column)):
            if column not in columns:
                raise DataError(f"{field}={column!r} is not a column of split {split!r}; columns: {columns}{hint}.")
        pick = (lambda row: row[source_column], lambda row: row[target_column])
    elif "translation" in columns:
        keys = _translation_keys(dataset)
        if source_lang is None or target_lang is None:
            raise ValueError(
                f"Split {split!r} has a 'translation' column; pass source_lang and target_lang, choosing from {keys}."
            )
        for field, lang in (("source_lang", source_lang), ("target_lang", target_lang)):
            if lang not in keys:
                raise ValueError(f"{field}={lang!r} is not a key of the 'translation' column; keys: {keys}.")
        pick = (lambda row: row["translation"][source_lang], lambda row: row["translation"][target_lang])
    elif "source" in columns and "target" in columns:
        pick = (lambda row: row["source"], lambda row: row["target"])
    elif source_lang in columns and target_lang in columns:
        pick = (lambda row: row[source_lang], lambda row: row[target_lang])
    else:
        raise DataError(
            f"Cannot find source and target text in split {split!r}; columns: {columns}{hint}. Pass "
            "source_column and target_column, or source_lang and target_lang for a 'translation' column "
            "or language-named columns."
        )
    get_source, get_target = pick

    def convert(batch: dict[str, list]) -> dict[str, list[str]]:
        rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
        return {
            "source": [_as_text(get_source(row)) for row in rows],
            "target": [_as_text(get_target(row)) for row in rows],
        }

    converted = dataset.map(convert, batched=True, remove_columns=columns, features=PAIR_FEATURES)
    # A missing or blank side is no training signal and breaks the tokenizer; drop it visibly.
    kept = converted.filter(lambda row: bool(row["source"].strip() and row["target"].strip()))
    if len(kept) < len(converted):
        logger.warning("Split %r: dropped %d rows with empty source or target", split, len(converted) - len(kept))
    if len(kept) == 0:
        raise DataError(f"Split {split!r} has no rows with both source and target text.")
    return kept


def load_parallel_data(
    dataset_name: str | None = None,
    dataset_config: str | None = None,
    train_file: str | os.PathLike | None = None,
    validation_file: str | os.PathLike | None = None,
    test_file: str | os.PathLike | None = None,
    source_lang: str | None = None,
    target_lang: str | None = None,
    source_column: str | None = None,
    target_column: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    require_train: bool = True,
) -> datasets.DatasetDict:
    """Load parallel text into a ``DatasetDict`` with string columns ``source`` and ``target``.

    Args:
        dataset_name: a Hub dataset id (``"wmt16"``), or a built-in corpus name (``"ding"``,
            ``"libreoffice"``, see :func:`build_default_corpus`). Mutually exclusive with files.
        dataset_config: the Hub dataset's configuration (``"ro-en"``).
        train_file / validation_file / test_file: local ``.jsonl``/``.json``/``.tsv``/``.csv`` files
            (one format for all; csv/tsv need a header row). ``train_file`` is required.
        source_lang / target_lang: keys of a ``translation`` dict column, or column names.
        source_column / target_column: explicit column names (take precedence).
        cache_dir: passed to ``datasets.load_dataset`` (or the built-in corpus cache root).
        require_train: Refuse data without a ``train`` split (training); off for scoring a model
            on a test file alone (``hf-fusion evaluate FOLDER --test_file X``).

    Returns:
        ``DatasetDict`` with a ``train`` split (when required) and whichever of ``validation``/``test`` exist;
        rows with an empty source or target are dropped (with a warning).

    Raises:
        ValueError: a missing column (names the columns that exist), an empty file, a language
            key the ``translation`` column does not have (names the keys), no ``train`` split.
    """
    files = {
        split: os.fspath(path)
        for split, path in (("train", train_file), ("validation", validation_file), ("test", test_file))
        if path is not None
    }
    if dataset_name is not None and files:
        raise ValueError("Pass either dataset_name or data files (train_file, ...), not both.")
    if dataset_name is None and not files:
        raise ValueError(
            f"Pass dataset_name (a Hub dataset or a built-in corpus: {sorted(BUILTIN_CORPORA)}) or train_file."
        )
    if dataset_name in BUILTIN_CORPORA:
        return build_default_corpus(dataset_name, cache_dir=cache_dir)
    if require_train and files and "train" not in files:
        raise ValueError(f"train_file is required; got only {sorted(files)} files.")

    cache = os.fspath(cache_dir) if cache_dir is not None else None
    if files:
        builder, options = _file_builder(files)
        try:
            raw = datasets.load_dataset(builder, data_files=files, cache_dir=cache, **options)
        except datasets.exceptions.DatasetGenerationError as error:
            cause = error.__cause__ or error
            raise DataError(
                f"could not read the data files {files} as {builder}: {' '.join(str(cause).split())}; fix the row it "
                "names (one pair per row, the header's columns)."
            ) from error
        except ValueError as error:
            # datasets' message for a file without data rows (e.g. a csv header only) names no file.
            empty = re.search(r'Instruction "(\w+)" corresponds to no data', str(error))
            if empty is None:
                raise
            split = empty.group(1)
            raise DataError(f"{split}_file={files[split]!r} has no data rows.") from error
    else:
        raw = datasets.load_dataset(dataset_name, dataset_config, cache_dir=cache)
    if not isinstance(raw, datasets.DatasetDict) or (require_train and "train" not in raw):
        splits = list(raw) if isinstance(raw, datasets.DatasetDict) else []
        raise ValueError(f"Dataset {dataset_name!r} has no 'train' split; splits: {splits}.")
    return datasets.DatasetDict(
        {
            split: _to_source_target(raw[split], split, source_lang, target_lang, source_column, target_column)
            for split in raw
        }
    )
