#!/usr/bin/env bash
# Set up and run the default test suite (slow tests are excluded by pytest.ini options),
# plus the linters and the import-layer contracts (pyproject.toml). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check src tests benchmarks
.venv/bin/mypy
.venv/bin/lint-imports
OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q "$@"
