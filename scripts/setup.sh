#!/usr/bin/env bash
# Set-up on a fresh machine (idempotent, stamped): a virtual environment with exactly the versions
# CI tested, from requirements.lock, then the project itself; and the Debian package the built-in
# corpus is made from.
#
#   bash scripts/setup.sh            .venv from requirements.lock (what `make train` / `make test` use)
#   bash scripts/setup.sh --latest   .venv-latest with the newest releases of torch, transformers,
#                                    accelerate, datasets, huggingface_hub, tokenizers and safetensors
#                                    (`make test-latest`: run before every submission)
#   bash scripts/setup.sh --lock     re-resolve pyproject.toml's ranges in a scratch environment and
#                                    rewrite requirements.lock (`make lock`)
#
# torch is installed first, pinned: on the machines this project runs on `pip install torch==2.13.0`
# takes a CPU build that lies on disk, while a bare `torch` requirement pulls the newest CUDA build
# (GBs).
set -euo pipefail
cd "$(dirname "$0")/.."
MODE="${1:-}"
TORCH_PIN="torch==2.13.0"
NEWEST=(torch transformers accelerate datasets huggingface_hub tokenizers safetensors)

if [ ! -e /usr/share/trans/de-en ] && command -v apt-get >/dev/null 2>&1; then
  { apt-get update -qq && apt-get install -y -qq trans-de-en; } >/dev/null 2>&1 \
    || echo "note: could not apt-get install trans-de-en; the built-in corpus will not be available"
fi

pip_in() { "$1/bin/python" -m pip install -q --disable-pip-version-check "${@:2}"; }

case "$MODE" in
  "")
    VENV=.venv
    STAMP="$VENV/.hf_fusion-setup"
    WANT=$(cat requirements.lock pyproject.toml | sha256sum | cut -d' ' -f1)
    if [ -x "$VENV/bin/python" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$WANT" ]; then
      echo "set-up up to date: $VENV matches requirements.lock"
      exit 0
    fi
    [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
    pip_in "$VENV" "$TORCH_PIN"
    pip_in "$VENV" -r requirements.lock
    pip_in "$VENV" --no-deps -e .
    "$VENV/bin/python" -m pip check
    echo "$WANT" > "$STAMP"
    echo "set-up done: $VENV holds requirements.lock"
    ;;
  --latest)
    VENV=.venv-latest
    [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
    pip_in "$VENV" --upgrade "${NEWEST[@]}"
    pip_in "$VENV" --upgrade -e ".[test]"
    "$VENV/bin/python" -m pip check
    "$VENV/bin/python" -m pip list --disable-pip-version-check 2>/dev/null | grep -iE "^(torch|transformers|accelerate|datasets|huggingface.hub|tokenizers|safetensors) "
    ;;
  --lock)
    SCRATCH=$(mktemp -d)
    python3 -m venv "$SCRATCH/venv"
    pip_in "$SCRATCH/venv" "$TORCH_PIN"
    pip_in "$SCRATCH/venv" ".[test]"
    {
      echo "# The whole dependency closure at the versions CI tests (scripts/setup.sh --lock rewrites it)."
      echo "# torch is the CPU build; scripts/setup.sh installs it first."
      "$SCRATCH/venv/bin/python" -m pip freeze --exclude-editable --disable-pip-version-check | grep -v "^hf_fusion" \
        | sed -E 's/^torch==([0-9.]+)\+cpu$/torch==\1/'
    } > requirements.lock
    rm -rf "$SCRATCH"
    echo "requirements.lock rewritten"
    ;;
  *)
    echo "usage: bash scripts/setup.sh [--latest|--lock]" >&2
    exit 2
    ;;
esac
