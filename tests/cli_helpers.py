"""Shared pieces of the training-tool tests: a real corpus slice, a recording Hub stand-in.

``ding_files()`` builds the Ding corpus once per test session (in a temporary cache) and writes a
few hundred pairs of it as jsonl files, so the CLI tests train on real sentences through the
local-file path in seconds. Tests that need a built-in corpus carry ``requires_ding`` (or
``requires_corpus(name)``): without the Debian package installed they are skipped, saying why,
because fetching the package needs a network the tests must not use.

``RecordingHub`` replaces the Hub client that every upload goes through
(``transformers.utils.hub._hf_api``) and keeps what would have been uploaded;
``publish_to_hf_cache`` lays an upload out as the offline Hub cache, so loading it by repo id
and revision can be tested without a network.
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from training.batching import TokenizedPairs
from training.corpora import build_default_corpus, missing_packages

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "training" / "configs"


def requires_corpus(name: str) -> pytest.MarkDecorator:
    """Skip a test unless the Debian packages of built-in corpus ``name`` are installed."""
    missing = missing_packages(name)
    return pytest.mark.skipif(
        bool(missing),
        reason=f"needs the built-in {name!r} corpus: install its Debian package(s) with "
        f"`apt-get install -y {' '.join(missing)}` (the tests never download it)",
    )


requires_ding = requires_corpus("ding")


@functools.lru_cache(maxsize=None)
def ding_files(train: int = 320, validation: int = 16, test: int = 16) -> dict[str, Path]:
    """``{"train"|"validation"|"test": jsonl path, "cache_dir": corpus cache}`` of a Ding slice."""
    root = Path(tempfile.mkdtemp(prefix="hf_fusion_cli_tests_"))
    corpus = build_default_corpus("ding", cache_dir=root / "corpora")
    files: dict[str, Path] = {"cache_dir": root / "corpora"}
    for split, size in (("train", train), ("validation", validation), ("test", test)):
        path = root / f"{split}.jsonl"
        rows = corpus[split].select(range(size))
        path.write_text(
            "".join(json.dumps({"source": s, "target": t}, ensure_ascii=False) + "\n" for s, t in zip(rows["source"], rows["target"])),
            encoding="utf-8",
        )
        files[split] = path
    return files


def data_overrides(**sizes: int) -> list[str]:
    """Command-line options that point a run at the Ding slice files."""
    files = ding_files(**sizes)
    return [
        "--train_file", str(files["train"]),
        "--validation_file", str(files["validation"]),
        "--test_file", str(files["test"]),
    ]


def debug_configs() -> list[Path]:
    return sorted(CONFIG_DIR.glob("*_debug.yaml"))


def random_pairs(lengths: list[tuple[int, int]]) -> TokenizedPairs:
    """Pairs of random token ids with the given (source, target) lengths, ids in [5, 50)."""
    rng = np.random.default_rng(0)
    source = [rng.integers(5, 50, n) for n, _ in lengths]
    target = [rng.integers(5, 50, m) for _, m in lengths]

    def flat(rows: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        offsets = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)
        return np.concatenate(rows).astype(np.int32), offsets

    return TokenizedPairs(flat(source), flat(target))


@dataclass
class RecordingHub:
    """Stands in for ``huggingface_hub.HfApi``: records calls, stores every commit's files."""

    calls: list[tuple[str, dict]] = field(default_factory=list)
    commits: list[tuple[str, str, dict[str, bytes]]] = field(default_factory=list)  # (repo, oid, files)

    def _files(self, repo_id: str) -> dict[str, bytes]:
        for repo, _, files in reversed(self.commits):
            if repo == repo_id:
                return dict(files)
        return {}

    def _commit(self, repo_id: str, files: dict[str, bytes]) -> SimpleNamespace:
        digest = hashlib.sha1(repr(sorted((k, hashlib.sha1(v).hexdigest()) for k, v in files.items())).encode())
        oid = digest.hexdigest()
        self.commits.append((repo_id, oid, files))
        return SimpleNamespace(oid=oid, commit_url=f"https://huggingface.co/{repo_id}/commit/{oid}")

    def create_repo(self, repo_id: str, **kwargs) -> SimpleNamespace:
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        return SimpleNamespace(repo_id=repo_id)

    def create_branch(self, repo_id: str, **kwargs) -> None:
        self.calls.append(("create_branch", {"repo_id": repo_id, **kwargs}))

    def upload_folder(self, *, repo_id: str, folder_path: str, **kwargs) -> SimpleNamespace:
        self.calls.append(("upload_folder", {"repo_id": repo_id, "folder_path": folder_path, **kwargs}))
        files = self._files(repo_id)
        for path in Path(folder_path).rglob("*"):
            if path.is_file():
                files[path.relative_to(folder_path).as_posix()] = path.read_bytes()
        return self._commit(repo_id, files)

    def upload_file(self, *, path_or_fileobj, path_in_repo: str, repo_id: str, **kwargs) -> SimpleNamespace:
        self.calls.append(("upload_file", {"path_in_repo": path_in_repo, "repo_id": repo_id, **kwargs}))
        data = path_or_fileobj if isinstance(path_or_fileobj, bytes) else Path(path_or_fileobj).read_bytes()
        files = self._files(repo_id)
        files[path_in_repo] = data
        return self._commit(repo_id, files)


def publish_to_hf_cache(hub: RecordingHub, hf_home: Path) -> None:
    """Lay every recorded commit out as ``HF_HOME/hub/models--ORG--NAME/snapshots/<oid>/``, with
    ``refs/main`` at each repository's last commit (what an offline ``from_pretrained`` reads)."""
    for repo_id, oid, files in hub.commits:
        repo_dir = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
        snapshot = repo_dir / "snapshots" / oid
        if snapshot.exists():
            shutil.rmtree(snapshot)
        for name, data in files.items():
            (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
            (snapshot / name).write_bytes(data)
        (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
        (repo_dir / "refs" / "main").write_text(oid)
