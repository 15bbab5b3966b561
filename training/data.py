"""Parallel text for training and evaluating hf_fusion models: the one loading entry point.

:func:`load_parallel_data` returns a :class:`datasets.DatasetDict` whose splits have exactly two
string columns, ``source`` and ``target``, from any of:

* a built-in corpus name (``"ding"``, ``"libreoffice"``): built from a Debian package by
  :mod:`training.corpora`;
* a Hub dataset (a ``translation`` dict column as in ``wmt16``, or plain columns);
* local jsonl/json/tsv/csv files.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import datasets

from .corpora import BUILTIN_CORPORA, PAIR_FEATURES, build_default_corpus

logger = logging.getLogger(__name__)

# File suffix -> (datasets builder, builder options). TSV is read without quote handling
# (sentences contain quotes) and no cell is turned into NaN ("NA" and "null" are words).
_FILE_BUILDERS: dict[str, tuple[str, dict]] = {
    ".jsonl": ("json", {}),
    ".json": ("json", {}),
    ".csv": ("csv", {"keep_default_na": False, "na_filter": False}),
    ".tsv": ("csv", {"delimiter": "\t", "quoting": 3, "keep_default_na": False, "na_filter": False}),
}


def _is_blank(path: Path, chunk_size: int = 1 << 16) -> bool:
    """True if the file holds only whitespace (read lazily: big files stop at the first text)."""
    with open(path, encoding="utf-8") as handle:
        while chunk := handle.read(chunk_size):
            if chunk.strip():
                return False
    return True


def _file_builder(files: dict[str, str]) -> tuple[str, dict]:
    suffixes = set()
    for split, path in files.items():
        suffix = Path(path).suffix.lower()
        if suffix not in _FILE_BUILDERS:
            raise ValueError(
                f"{split}_file={path!r} has an unsupported extension {suffix!r}; allowed: {sorted(_FILE_BUILDERS)}."
            )
        if not Path(path).is_file():
            raise ValueError(f"{split}_file={path!r} does not exist.")
        if _is_blank(Path(path)):
            raise ValueError(f"{split}_file={path!r} is empty.")
        suffixes.add(_FILE_BUILDERS[suffix][0] + str(_FILE_BUILDERS[suffix][1]))
    if len(suffixes) > 1:
        raise ValueError(f"All data files must have the same format; got {files}.")
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
                raise ValueError(f"{field}={column!r} is not a column of split {split!r}; columns: {columns}{hint}.")
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
        raise ValueError(
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
        raise ValueError(f"Split {split!r} has no rows with both source and target text.")
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
        except ValueError as error:
            # datasets' message for a file without data rows (e.g. a csv header only) names no file.
            empty = re.search(r'Instruction "(\w+)" corresponds to no data', str(error))
            if empty is None:
                raise
            split = empty.group(1)
            raise ValueError(f"{split}_file={files[split]!r} has no data rows.") from error
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
