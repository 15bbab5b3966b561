#!/usr/bin/env bash
# One-time set-up on a fresh machine (idempotent): a virtual environment with the CPU build of
# torch pinned first (a bare `torch` requirement would pull the newest CUDA build, GBs), the
# project with its test extra, and the Debian package the built-in corpus is made from.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -e /usr/share/trans/de-en ] && command -v apt-get >/dev/null 2>&1; then
  { apt-get update -qq && apt-get install -y -qq trans-de-en; } >/dev/null 2>&1 \
    || echo "note: could not apt-get install trans-de-en; the data module will try 'apt-get download' itself"
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[test]"
echo "set-up done: .venv ready"
