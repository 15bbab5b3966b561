#!/usr/bin/env bash
# The claims grid on a GPU, one cell per call (a cell of benchmarks/grids/gpu_claims.yaml takes at
# most 8 minutes on an H200, so a 10-minute call always finishes one and records it).
#
#   bash benchmarks/gpu_evidence.sh prepare   # on the CPU machine (network for the Debian packages):
#                                             # copy the grid's built corpora into benchmarks/data/corpora
#   bash benchmarks/gpu_evidence.sh           # on the GPU machine (no network): run the next cell
#
# Environment: GRID (default benchmarks/grids/gpu_claims.yaml), WORK_DIR (default
# runs/compare/<grid name>), RESULTS_DIR (default benchmarks/results/claims/<grid name>), PYTHON
# (default .venv/bin/python, else python3). When OUT is set (the device machine's return folder),
# the results folder is copied there after the cell; copy it back into RESULTS_DIR and commit it.
set -euo pipefail
cd "$(dirname "$0")/.."
GRID=${GRID:-benchmarks/grids/gpu_claims.yaml}
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
DATA=benchmarks/data/corpora
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
NAME=$("$PYTHON" -c "import sys; from training.compare.grid import load_grid; print(load_grid(sys.argv[1]).name)" "$GRID")

if [ "${1:-}" = prepare ]; then
  "$PYTHON" - "$GRID" "$DATA" <<'PY'
import shutil, sys
from pathlib import Path
from training.compare.grid import load_grid
from training.corpora import build_default_corpus, default_cache_root
target = Path(sys.argv[2])
for corpus in load_grid(sys.argv[1]).corpora:
    build_default_corpus(corpus)  # built once in the cache (fetches the Debian package if needed)
    shutil.copytree(default_cache_root() / corpus, target / corpus, dirs_exist_ok=True)
    print(f"{corpus}: {target / corpus}")
PY
  exit 0
fi

# Offline: the corpora come from the tree, nothing from the Hub.
if [ -d "$DATA" ]; then export HF_FUSION_DATA="$PWD/$DATA"; fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
WORK_DIR=${WORK_DIR:-runs/compare/$NAME}
RESULTS_DIR=${RESULTS_DIR:-benchmarks/results/claims/$NAME}
status=0
"$PYTHON" -m training.cli compare "$GRID" --work_dir "$WORK_DIR" --results_dir "$RESULTS_DIR" --max_cells 1 || status=$?
"$PYTHON" -m training.cli compare "$GRID" --work_dir "$WORK_DIR" --results_dir "$RESULTS_DIR" --status | tail -n 1
if [ -n "${OUT:-}" ] && [ -d "$RESULTS_DIR" ]; then
  mkdir -p "$OUT/claims" && cp -r "$RESULTS_DIR" "$OUT/claims/$NAME"
fi
exit "$status"
