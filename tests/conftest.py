"""Test set-up shared by every test: offline Hub, a private HF cache, tiny models.

Everything here runs offline: ``HF_HUB_OFFLINE=1`` is set before huggingface_hub is imported and
each test session gets its own ``HF_HOME`` so remote-code modules of one run never leak into
another.
"""

from __future__ import annotations

import os
import tempfile

_HF_HOME = tempfile.mkdtemp(prefix="hf_fusion_tests_hf_home_")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HOME"] = _HF_HOME
os.environ["HF_MODULES_CACHE"] = os.path.join(_HF_HOME, "modules")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Under pytest-xdist every worker is its own process: one intra-op thread each keeps N workers on N
# cores instead of oversubscribing them (the tiny models gain nothing from more threads, and an
# oversubscribed run was measured several times slower). Subprocesses the tests start inherit it.
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

if "PYTEST_XDIST_WORKER" in os.environ:
    torch.set_num_threads(1)

from tests.helpers import TINY  # noqa: E402


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def tiny() -> dict:
    """Keyword arguments of a tiny config: width 16, 2+2 layers, vocab 100."""
    return dict(TINY)

# The stand-ins for modules transformers' sdist does not ship are copied into the extracted test
# package (tests/transformers_suite.py); they are not test modules of their own.
collect_ignore_glob = ["transformers_standins/*"]
