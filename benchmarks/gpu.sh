#!/usr/bin/env bash
# The GPU measurements of issue 15 in one run, under 8 minutes on one H100/H200:
#   1. the speed table vs HF BART at the benchmark size and at the papers' size (speed.py),
#   2. bf16 training throughput vs BART with the MFU figure (throughput.py),
#   3. the speed table again with flash attention 2, when the flash_attn package is installed.
# Results: speed_cuda.{json,md}, speed_cuda_paper.{json,md}, throughput_cuda.{json,md}
# (+ speed_cuda_flash.*) in OUT_DIR (default benchmarks/results).
#
# Usage: bash benchmarks/gpu.sh [--dry-run] [OUT_DIR]
#   --dry-run  the same steps on the CPU at the tiny size with one round (a smoke test of the
#              script; it writes *_cpu_tiny / throughput_cpu files, default OUT_DIR a temp dir).
set -euo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then
  DRY_RUN=1
  shift
fi
PY="${PYTHON:-.venv/bin/python}"
[[ -x "$PY" ]] || PY=python

if [[ $DRY_RUN == 1 ]]; then
  OUT="${1:-$(mktemp -d)}"
  DEVICE=(--device cpu)
  SPEED_BENCH=(--size tiny --rounds 1 --steps 1 --batch 4 --src_len 8 --tgt_len 8 --new_tokens 4 --no-memory)
  SPEED_PAPER=()
  THROUGHPUT=(--size tiny --batch 4 --src_len 8 --tgt_len 8 --rounds 1 --steps 1)
  LIMIT=300
else
  OUT="${1:-benchmarks/results}"
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu.sh: no CUDA device (use --dry-run on a CPU)')"
  DEVICE=(--device cuda)
  SPEED_BENCH=(--size bench --rounds 5)
  SPEED_PAPER=(--size paper --rounds 3 --batch 64 --src_len 64 --tgt_len 64)
  THROUGHPUT=(--size paper --batch 64 --src_len 128 --tgt_len 128 --rounds 3 --steps 10)
  LIMIT=150
fi
mkdir -p "$OUT"
start=$(date +%s)

timeout "$LIMIT" "$PY" benchmarks/speed.py "${DEVICE[@]}" "${SPEED_BENCH[@]}" --out "$OUT"
if [[ ${#SPEED_PAPER[@]} -gt 0 ]]; then
  timeout "$LIMIT" "$PY" benchmarks/speed.py "${DEVICE[@]}" "${SPEED_PAPER[@]}" --out "$OUT"
fi
timeout "$LIMIT" "$PY" benchmarks/throughput.py "${DEVICE[@]}" "${THROUGHPUT[@]}" --out "$OUT"
if [[ $DRY_RUN == 0 ]] && "$PY" -c "import flash_attn" 2>/dev/null; then
  timeout "$LIMIT" "$PY" benchmarks/speed.py "${DEVICE[@]}" --size bench --rounds 3 --attn flash_attention_2 \
    --variants fusion_transformer --no-memory --out "$OUT/flash"
  for ext in json md; do mv "$OUT/flash/speed_cuda.$ext" "$OUT/speed_cuda_flash.$ext"; done
  rmdir "$OUT/flash"
fi
echo "gpu.sh: done in $(( $(date +%s) - start )) s; results in $OUT"
