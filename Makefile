# The README's commands. Every target sets up first (scripts/setup.sh is stamped: a no-op when the
# environment already matches requirements.lock).
PY := .venv/bin/python

.PHONY: setup train test test-fast test-latest lock bench contract-report

setup:
	bash scripts/setup.sh

# Main job: train the default family on the built-in corpus, evaluate, export a Hub-ready folder.
train: setup
	.venv/bin/hf-fusion train training/configs/default.yaml

# The test suite (what .ci/run runs).
test: setup
	$(PY) -m pytest -n 2 -q

# The fast tier for contributors (under a minute): everything but the tests marked slow (subprocess
# round trips, compilation, end-to-end trainings, transformers' common tests).
test-fast: setup
	$(PY) -m pytest -n 2 -q -m "not slow"

# The same suite against the newest releases of torch, transformers, accelerate, datasets,
# huggingface_hub, tokenizers and safetensors, in .venv-latest. Run before every submission.
test-latest:
	bash scripts/setup.sh --latest
	.venv-latest/bin/python -m pytest -n 2 -q

# Re-resolve pyproject.toml's ranges and rewrite requirements.lock.
lock:
	bash scripts/setup.sh --lock

# transformers' common model tests per family, written to docs/transformers_contract.md.
contract-report: setup
	$(PY) scripts/contract_report.py

bench: setup
	$(PY) benchmarks/speed.py
