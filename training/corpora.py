"""The built-in parallel corpora: real, human-translated text that needs no Hub access.

:func:`build_default_corpus` builds a :class:`datasets.DatasetDict` (splits ``train`` /
``validation`` / ``test``, string columns ``source`` and ``target``) from a Debian package: fetched
with ``apt-get download`` and unpacked with ``dpkg-deb -x`` into a cache folder, so no root is
needed; an already installed copy of the package is used as is. The library never runs ``apt-get
update`` or ``apt-get install``: changing the system's packages is ``scripts/setup.sh``'s job, and
the error names the command. The default, ``"ding"``, is
English -> German example sentences from the Ding dictionary (Debian ``trans-de-en``, GPL-2+):
short everyday sentences, small enough to train a tiny model on a CPU. ``"libreoffice"`` is
English -> German LibreOffice help paragraphs (MPL-2.0): longer, more technical text.
``docs/data.md`` gives their sizes.

User files and Hub datasets are read by :mod:`training.data`, whose ``load_parallel_data`` also
accepts these corpus names.

Design choices:

* Splits are deterministic without any random state: every pair is ranked by a SHA-256 of the
  seed and its normalised source sentence; the first ``test_size`` ranks are test, the next
  ``validation_size`` validation, the rest train. The same package version therefore always gives
  the same splits, on every machine, and a ``max_pairs`` build is a prefix of the full ranking.
* Duplicates are removed on the *normalised* source (case-folded, punctuation and spacing
  ignored) before splitting, so no validation or test source sentence -- not even "Stop!" vs
  "stop." -- also occurs in train.
* The built corpus is cached with ``DatasetDict.save_to_disk`` (written to a temporary folder and
  renamed, so concurrent builds never see half a corpus) next to a ``build_info.json`` that
  records the options, the package version and the split sizes. A later call with the same
  options loads it memory-mapped.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import datasets

from .errors import SetupError

logger = logging.getLogger(__name__)

# Bump when the cleaning or splitting rules change: cached corpora of another version are rebuilt.
BUILD_VERSION = 1

SPLITS = ("train", "validation", "test")


# --------------------------------------------------------------------------------------------------
# Debian packages as a data source
# --------------------------------------------------------------------------------------------------


def default_cache_root() -> Path:
    """``$HF_FUSION_DATA`` if set, else ``~/.cache/hf_fusion/corpora``."""
    env = os.environ.get("HF_FUSION_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "hf_fusion" / "corpora"


def _installed(data_path: str) -> bool:
    """Whether a Debian package's data path (no leading ``/``) exists on this system."""
    return (Path("/") / data_path).exists()


def _run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False)


def fetch_debian_package(package: str, data_path: str, cache_root: Path) -> tuple[Path, str]:
    """Make the files of a Debian package readable without installing it.

    Args:
        package: Debian package name, e.g. ``"trans-de-en"``.
        data_path: a path inside the package (no leading ``/``) that must exist afterwards; it
            decides whether an installed or already unpacked copy can be used.
        cache_root: the package is unpacked into ``cache_root / "packages" / package``.

    Returns:
        ``(base, version)``: ``base / data_path`` exists; ``base`` is ``/`` for an installed
        package. ``version`` is the Debian package version, recorded in the corpus' build info.

    Raises:
        SetupError (a RuntimeError): when neither an installed copy nor ``apt-get download`` is
            available; the message gives the command that installs the package.
    """
    if _installed(data_path):
        query = _run(["dpkg-query", "-W", "-f=${Version}", package], cwd=Path("/"))
        return Path("/"), query.stdout.strip() if query.returncode == 0 else "installed"

    unpacked = cache_root / "packages" / package
    version_file = unpacked / "VERSION"
    if (unpacked / data_path).exists() and version_file.exists():
        return unpacked, version_file.read_text().strip()

    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise SetupError(
            f"Debian package {package!r} is needed to build this corpus, but apt-get/dpkg-deb are not "
            "available on this system. Use load_parallel_data(train_file=...) with your own files instead."
        )
    cache_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_root, prefix=f".{package}-") as tmp:
        workdir = Path(tmp)
        # Only a download into our own cache: changing the system's packages or package lists
        # (apt-get update / install) is the set-up script's job, never this library's.
        download = _run(["apt-get", "download", package], cwd=workdir)
        debs = sorted(workdir.glob(f"{package}_*.deb"))
        if download.returncode != 0 or not debs:
            raise SetupError(
                f"the built-in corpus needs Debian package {package!r}, and `apt-get download {package}` failed "
                f"({download.stderr.strip().splitlines()[-1] if download.stderr.strip() else 'no .deb written'}); "
                f"install it with `sudo apt-get update && sudo apt-get install -y {package}` (or run "
                "`bash scripts/setup.sh`), or train on your own files with --train_file."
            )
        target = workdir / "root"
        unpack = _run(["dpkg-deb", "-x", str(debs[0]), str(target)], cwd=workdir)
        if unpack.returncode != 0:
            raise SetupError(f"`dpkg-deb -x {debs[0].name}` failed:\n{unpack.stderr.strip()}")
        version = _run(["dpkg-deb", "-f", str(debs[0]), "Version"], cwd=workdir).stdout.strip()
        (target / "VERSION").write_text(version + "\n")
        unpacked.parent.mkdir(parents=True, exist_ok=True)
        _publish(target, unpacked, replace=unpacked.exists())
    return unpacked, (unpacked / "VERSION").read_text().strip()


def _publish(staging: Path, final: Path, replace: bool) -> None:
    """Move a finished folder into place with one rename, so readers never see half of it.

    ``replace`` drops an existing (stale) ``final`` first. If another process publishes the same
    folder in between, the rename fails on the non-empty target and that process' copy is kept.
    """
    if replace and final.exists():
        shutil.rmtree(final, ignore_errors=True)
    try:
        os.replace(staging, final)
    except OSError:
        if not final.exists():
            raise
        shutil.rmtree(staging, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# Corpus readers: raw package files -> (English, other language) sentence pairs, in file order
# --------------------------------------------------------------------------------------------------

# Ding markup: {f} grammar tags, [coll.] usage labels, /IYKWIM/ abbreviations.
_DING_TAG = re.compile(r"\s*(\{[^{}]*\}|\[[^\[\]]*\]|/[A-Z][A-Za-z]+/)")
# Pairs still holding a placeholder (sth., jdn.), an optional part "(that)", slash alternatives
# "read/have" or an ellipsis are dictionary patterns, not sentences with one right translation.
_DING_NOT_A_SENTENCE = re.compile(r"[/()…]|\.\.\.|\b(?:sth|sb|etw|jdn|jdm|jds|jd)\.")
_SENTENCE_START = re.compile(r"^[\"'‘“„]?[A-ZÄÖÜ0-9]")


def strip_ding_markup(text: str) -> str:
    """Ding text without its tags (``{f}``, ``[coll.]``, ``/IYKWIM/``), with single spaces."""
    return " ".join(_DING_TAG.sub("", text).split())


def _ding_side(text: str) -> str:
    """First ``;`` alternative of one Ding sub-entry, without tags, with single spaces."""
    return strip_ding_markup(text.split("; ", 1)[0])


def _is_ding_sentence(text: str) -> bool:
    return (
        len(text.split()) >= 4
        and text[-1] in ".!?"
        and _SENTENCE_START.match(text) is not None
        and _DING_NOT_A_SENTENCE.search(text) is None
    )


def read_ding_pairs(path: Path) -> Iterator[tuple[str, str]]:
    """English -> German example sentences from a Ding dictionary file (``usr/share/trans/de-en``).

    Of each sub-entry pair (:func:`ding_sub_entries`) only real sentences are kept: at least 4
    words, sentence-final punctuation and a capital (or digit) first letter on both sides, no
    dictionary patterns (see ``_DING_NOT_A_SENTENCE``).
    """
    for german_entry, english_entry in ding_sub_entries(path):
        # Cheap rejection first: most sub-entries are words or phrases without a full stop.
        if "." not in english_entry and "!" not in english_entry and "?" not in english_entry:
            continue
        source = _ding_side(english_entry)
        if not _is_ding_sentence(source):
            continue
        target = _ding_side(german_entry)
        if source != target and _is_ding_sentence(target):
            yield source, target


def ding_sub_entries(path: str | os.PathLike) -> Iterator[tuple[str, str]]:
    """(German, English) sub-entry pairs of a Ding dictionary file, in file order, markup kept.

    Lines read ``German | sub-entry :: English | sub-entry``; sub-entries pair up only when both
    sides have the same number of them (otherwise the line is skipped). Comment lines start with
    ``#``.
    """
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.startswith("#") or " :: " not in line:
                continue
            german, english = line.rstrip("\n").split(" :: ", 1)
            german_entries, english_entries = german.split(" | "), english.split(" | ")
            if len(german_entries) == len(english_entries):
                yield from zip(german_entries, english_entries)


# HTML elements without an end tag: they must not change the nesting depth.
_VOID_ELEMENTS = frozenset(
    {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "param", "source", "track", "wbr"}
)


class _HelpPageParser(HTMLParser):
    """Collects the text of every ``par_id``/``hd_id`` element of one LibreOffice help page.

    Those ids are shared by all languages of a page, which is what aligns the translations.
    Platform variants (``<span class="switchinline">`` with hidden ``MAC``/``default`` children)
    keep only the ``default`` one, so "Ctrl+Z" is not rendered as "Command+ZCtrl+Z" or "+Z".
    """

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.paragraphs: dict[str, str] = {}
        self._depth = 0
        self._current: tuple[str, int] | None = None  # (id, depth) of the element being collected
        self._hidden_depth: int | None = None  # depth of the hidden element being skipped
        self._text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _VOID_ELEMENTS:
            return
        self._depth += 1
        attributes = dict(attrs)
        element_id = attributes.get("id") or ""
        if self._current is None:
            if element_id.startswith(("par_id", "hd_id")):
                self._current, self._text = (element_id, self._depth), []
        elif self._hidden_depth is None and "hidden" in attributes and not element_id.startswith("default"):
            self._hidden_depth = self._depth

    def handle_endtag(self, tag: str) -> None:
        if tag in _VOID_ELEMENTS:
            return
        if self._hidden_depth == self._depth:
            self._hidden_depth = None
        if self._current is not None and self._current[1] == self._depth:
            # A page that embeds another page's section repeats its ids: keep the first.
            self.paragraphs.setdefault(self._current[0], " ".join("".join(self._text).split()))
            self._current = None
        self._depth -= 1

    def handle_data(self, data: str) -> None:
        if self._current is not None and self._hidden_depth is None:
            self._text.append(data)


def _help_paragraphs(path: Path) -> dict[str, str]:
    parser = _HelpPageParser()
    parser.feed(path.read_text(encoding="utf-8"))
    parser.close()
    return parser.paragraphs


def read_libreoffice_pairs(english_dir: Path, other_dir: Path) -> Iterator[tuple[str, str]]:
    """English -> other-language paragraph pairs from two LibreOffice help trees (``help/<lang>/text``).

    Pages pair up by relative path, paragraphs by their ``par_id``/``hd_id``; pairs with an empty
    side or an untranslated (identical) text are dropped. Files are read in sorted order, so the
    output is deterministic.
    """
    for english_page in sorted(english_dir.rglob("*.html")):
        other_page = other_dir / english_page.relative_to(english_dir)
        if not other_page.is_file():
            continue
        other = _help_paragraphs(other_page)
        for paragraph_id, source in _help_paragraphs(english_page).items():
            target = other.get(paragraph_id)
            if source and target and source != target:
                yield source, target


@dataclass(frozen=True)
class CorpusSource:
    """Where a built-in corpus comes from and how its raw files become sentence pairs."""

    description: str
    license: str
    packages: tuple[tuple[str, str], ...]  # (Debian package, path inside it that must exist)
    read_pairs: Callable[[list[Path]], Iterable[tuple[str, str]]]  # package data paths -> pairs
    source_lang: str
    target_lang: str


BUILTIN_CORPORA: dict[str, CorpusSource] = {
    "ding": CorpusSource(
        description="Ding dictionary example sentences (Debian trans-de-en), English -> German",
        license="GPL-2.0-or-later",
        packages=(("trans-de-en", "usr/share/trans/de-en"),),
        read_pairs=lambda paths: read_ding_pairs(paths[0]),
        source_lang="en",
        target_lang="de",
    ),
    "libreoffice": CorpusSource(
        description="LibreOffice help paragraphs (Debian libreoffice-help-en-us/-de), English -> German",
        license="MPL-2.0",
        packages=(
            ("libreoffice-help-en-us", "usr/share/libreoffice/help/en-US/text"),
            ("libreoffice-help-de", "usr/share/libreoffice/help/de/text"),
        ),
        read_pairs=lambda paths: read_libreoffice_pairs(paths[0], paths[1]),
        source_lang="en",
        target_lang="de",
    ),
}


def missing_packages(name: str) -> list[str]:
    """The Debian packages of built-in corpus ``name`` that are not installed here.

    Without them :func:`build_default_corpus` has to ``apt-get download`` them, which needs package
    lists and a network; callers that must stay offline (the tests) check this first.
    """
    return [package for package, data_path in BUILTIN_CORPORA[name].packages if not _installed(data_path)]


# --------------------------------------------------------------------------------------------------
# Deterministic splits and the on-disk cache
# --------------------------------------------------------------------------------------------------


def normalize_for_dedup(text: str) -> str:
    """Case-folded words only: "Stop!" and "stop." are the same sentence for leakage purposes."""
    return " ".join(re.findall(r"\w+", text.casefold()))


def split_pairs(
    pairs: Iterable[tuple[str, str]],
    validation_size: int,
    test_size: int,
    seed: int = 0,
    max_pairs: int | None = None,
) -> dict[str, list[tuple[str, str]]]:
    """Deduplicate on the normalised source and cut deterministic train/validation/test splits.

    Each pair is ranked by ``sha256(seed, normalised source)``; test takes the first
    ``test_size`` ranks, validation the next ``validation_size``, train the rest (of the first
    ``max_pairs`` ranks when given). Because the ranking depends only on the sentence itself,
    adding or removing other pairs (a package update) moves few sentences between splits.
    """
    ranked: dict[str, tuple[str, tuple[str, str]]] = {}
    for source, target in pairs:
        key = normalize_for_dedup(source)
        if key and key not in ranked:  # keep the first occurrence in file order
            digest = hashlib.sha256(f"{seed}\x00{key}".encode()).hexdigest()
            ranked[key] = (digest, (source, target))
    ordered = [pair for _, pair in sorted(ranked.values())]
    if max_pairs is not None:
        ordered = ordered[:max_pairs]
    if len(ordered) <= validation_size + test_size:
        raise ValueError(
            f"The corpus has {len(ordered)} unique pairs, not enough for validation_size={validation_size} + "
            f"test_size={test_size} and a non-empty train split; lower them or raise max_pairs."
        )
    return {
        "test": ordered[:test_size],
        "validation": ordered[test_size : test_size + validation_size],
        "train": ordered[test_size + validation_size :],
    }


PAIR_FEATURES = datasets.Features({"source": datasets.Value("string"), "target": datasets.Value("string")})


def _pairs_to_dataset(pairs: list[tuple[str, str]], info: datasets.DatasetInfo | None = None) -> datasets.Dataset:
    return datasets.Dataset.from_dict(
        {"source": [source for source, _ in pairs], "target": [target for _, target in pairs]},
        features=PAIR_FEATURES,
        info=info,
    )


def build_default_corpus(
    name: str = "ding",
    cache_dir: str | os.PathLike | None = None,
    *,
    validation_size: int = 1000,
    test_size: int = 1000,
    max_pairs: int | None = None,
    seed: int = 0,
    overwrite: bool = False,
) -> datasets.DatasetDict:
    """Build (first call) or load (later calls) a built-in parallel corpus.

    Args:
        name: one of ``BUILTIN_CORPORA`` (``"ding"``, ``"libreoffice"``).
        cache_dir: root folder of the cache; defaults to :func:`default_cache_root`. The corpus is
            stored in ``<cache_dir>/<name>`` (default options) or ``<cache_dir>/<name>-<hash of the
            options>``, the unpacked Debian packages in ``<cache_dir>/packages``.
        validation_size: pairs in the validation split.
        test_size: pairs in the test split.
        max_pairs: keep only this many pairs (a deterministic subset: the first ranks of the split
            ordering), e.g. for fast tests and demos.
        seed: changes the split ranking.
        overwrite: rebuild even if a cached copy exists.

    Returns:
        ``DatasetDict`` with ``train``/``validation``/``test`` splits of ``source``/``target`` strings.
    """
    if name not in BUILTIN_CORPORA:
        raise ValueError(f"Unknown built-in corpus name={name!r}; allowed values: {sorted(BUILTIN_CORPORA)}.")
    for field, value in (("validation_size", validation_size), ("test_size", test_size)):
        if value < 0:
            raise ValueError(f"{field} must be >= 0, got {value}.")
    if max_pairs is not None and max_pairs <= 0:
        raise ValueError(f"max_pairs must be a positive int or None, got {max_pairs}.")
    spec = BUILTIN_CORPORA[name]
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()
    options = {"validation_size": validation_size, "test_size": test_size, "max_pairs": max_pairs, "seed": seed}
    default_options = {"validation_size": 1000, "test_size": 1000, "max_pairs": None, "seed": 0}
    folder_name = name
    if options != default_options:
        folder_name += "-" + hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()[:10]
    folder = root / folder_name
    info_file = folder / "build_info.json"

    if not overwrite and info_file.exists():
        info = json.loads(info_file.read_text())
        if info.get("build_version") == BUILD_VERSION and info.get("options") == options:
            return datasets.load_from_disk(str(folder))
        logger.info("Cached corpus %s was built with other rules or options; rebuilding", folder)

    bases_and_versions = [fetch_debian_package(package, path, root) for package, path in spec.packages]
    data_paths = [base / path for (base, _), (_, path) in zip(bases_and_versions, spec.packages)]
    splits = split_pairs(spec.read_pairs(data_paths), validation_size, test_size, seed=seed, max_pairs=max_pairs)
    # Description and license travel with the saved splits (``dataset.info``), e.g. into model cards.
    dataset_info = datasets.DatasetInfo(
        description=spec.description, license=spec.license, features=PAIR_FEATURES
    )
    corpus = datasets.DatasetDict({split: _pairs_to_dataset(splits[split], dataset_info.copy()) for split in SPLITS})

    info = {
        "build_version": BUILD_VERSION,
        "name": name,
        "description": spec.description,
        "license": spec.license,
        "source_lang": spec.source_lang,
        "target_lang": spec.target_lang,
        "packages": {package: version for (package, _), (_, version) in zip(spec.packages, bases_and_versions)},
        "options": options,
        "num_pairs": {split: len(corpus[split]) for split in SPLITS},
    }
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=root, prefix=f".{folder_name}-"))
    corpus.save_to_disk(str(staging))
    (staging / "build_info.json").write_text(json.dumps(info, indent=2) + "\n")
    _publish(staging, folder, replace=folder.exists())
    return datasets.load_from_disk(str(folder))


def take_slice(corpus: datasets.DatasetDict, n_train: int, n_eval: int) -> datasets.DatasetDict:
    """The first ``n_train`` training and ``n_eval`` validation/test pairs of every split, for
    demos, debug runs and tests. Built-in corpora are already in hash (i.e. random) order."""
    return datasets.DatasetDict(
        {
            split: dataset.select(range(min(len(dataset), n_train if split == "train" else n_eval)))
            for split, dataset in corpus.items()
        }
    )


def corpus_statistics(corpus: datasets.DatasetDict) -> dict[str, dict[str, float]]:
    """Pairs and mean whitespace-separated words per side, per split (for logs and model cards)."""
    stats = {}
    for split, dataset in corpus.items():
        pairs = max(len(dataset), 1)
        stats[split] = {
            "pairs": len(dataset),
            "mean_source_words": sum(len(text.split()) for text in dataset["source"]) / pairs,
            "mean_target_words": sum(len(text.split()) for text in dataset["target"]) / pairs,
        }
    return stats


def main(argv: list[str] | None = None) -> None:
    """``python -m training.corpora [--name ding] [--cache-dir DIR]``: build (or load) a built-in corpus
    ahead of training and print its statistics as JSON."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--name", default="ding", choices=sorted(BUILTIN_CORPORA))
    parser.add_argument("--cache-dir", default=None, help="cache root (default: $HF_FUSION_DATA or ~/.cache/...)")
    parser.add_argument("--overwrite", action="store_true", help="rebuild even if a cached copy exists")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    corpus = build_default_corpus(args.name, cache_dir=args.cache_dir, overwrite=args.overwrite)
    report = {"name": args.name, "seconds": round(time.perf_counter() - start, 2), **corpus_statistics(corpus)}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
