"""transformers' own model tests, taken from the source distribution of the installed release.

The wheel of transformers does not ship its test suite; the source distribution (sdist) of the same
version on the package registry does, at least ``tests/test_modeling_common.py``
(``ModelTesterMixin``) and ``tests/test_configuration_common.py`` (``ConfigTester``). This module
downloads that sdist once per version (``pip download``, cached under ``.cache/transformers-tests``
in the repository, never committed), extracts those two files into a package of their own, and
imports them, so that every family is held to the contract transformers holds its own models to,
on whichever release is installed.

The two files import three modules the sdist does not ship. Their stand-ins live in
``tests/transformers_standins`` and are copied next to the extracted files:

- ``generation/test_utils.py``: ``GenerationTesterMixin`` is our own generation contract
  (``tests/generation_contract.py``): step logits of every decoding strategy against a
  teacher-forced forward.
- ``exporters/test_export.py``: ``ExportTesterMixin`` without tests (``torch.export`` is not a
  supported path of these models; BART gets the same empty stand-in).
- ``utils/test_configuration_utils.py``: ``config_common_kwargs``, the common config fields
  ``ConfigTester`` round-trips.
"""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from types import ModuleType

import transformers

REPO_ROOT = Path(__file__).resolve().parent.parent
CACHE_DIR = REPO_ROOT / ".cache" / "transformers-tests"
STANDINS = Path(__file__).resolve().parent / "transformers_standins"
SHIPPED = ("tests/test_modeling_common.py", "tests/test_configuration_common.py")


def package_name(version: str) -> str:
    """Import name of the extracted package of one release: ``transformers_tests_5_24_0``."""
    return "transformers_tests_" + "".join(ch if ch.isalnum() else "_" for ch in version)


def fetch_sdist(version: str, into: Path) -> Path:
    """Download the sdist of transformers ``version`` into ``into`` with pip; return its path."""
    into.mkdir(parents=True, exist_ok=True)
    found = sorted(into.glob(f"transformers-{version}.tar.gz"))
    if found:
        return found[0]
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
               f"transformers=={version}", "--dest", str(into)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    found = sorted(into.glob(f"transformers-{version}.tar.gz"))
    if result.returncode != 0 or not found:
        raise RuntimeError(
            f"Could not download the source distribution of transformers {version}, which carries the test suite "
            f"these tests run (`{' '.join(command)}` exited {result.returncode}): {result.stderr.strip()[-500:]}"
        )
    return found[0]


def build_package(version: str, cache_dir: Path = CACHE_DIR) -> Path:
    """Extract the shipped test files of ``version`` and the stand-ins into one package; return
    the folder to put on ``sys.path``. The extraction is cached; the stand-ins are refreshed on
    every call so that an edit to them takes effect."""
    root = cache_dir / version
    package = root / package_name(version)
    if not all((package / Path(name).name).exists() for name in SHIPPED):
        sdist = fetch_sdist(version, cache_dir / "sdists")
        staging = Path(tempfile.mkdtemp(dir=cache_dir))
        with tarfile.open(sdist) as archive:
            for member in archive.getmembers():
                relative = member.name.split("/", 1)[-1]
                if relative in SHIPPED:
                    member.name = Path(relative).name
                    archive.extract(member, staging, filter="data")
        missing = [name for name in SHIPPED if not (staging / Path(name).name).exists()]
        if missing:
            raise RuntimeError(f"The sdist of transformers {version} does not contain {missing}.")
        package.mkdir(parents=True, exist_ok=True)
        for name in SHIPPED:
            shutil.move(str(staging / Path(name).name), package / Path(name).name)
        shutil.rmtree(staging)
    (package / "__init__.py").touch()
    for standin in STANDINS.rglob("*.py"):
        target = package / standin.relative_to(STANDINS)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(standin, target)
    return root


def load_common_tests(version: str = transformers.__version__) -> tuple[ModuleType, ModuleType]:
    """Import ``test_modeling_common`` and ``test_configuration_common`` of the installed release."""
    root = build_package(version)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    name = package_name(version)
    return (
        importlib.import_module(f"{name}.test_modeling_common"),
        importlib.import_module(f"{name}.test_configuration_common"),
    )
