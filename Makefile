# The two commands of the README. Both set everything up first (idempotent).
PY := .venv/bin/python

.PHONY: setup train test bench

setup:
	bash scripts/setup.sh

# Main job: train the default family on the built-in corpus, evaluate, export a Hub-ready folder.
train: setup
	.venv/bin/hf-fusion train training/configs/default.yaml

# The test suite (the same command .ci/run runs).
test: setup
	$(PY) -m pytest -n 2 -q

bench: setup
	$(PY) benchmarks/speed.py
