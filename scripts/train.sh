#!/usr/bin/env bash
# Set up and run the main job: train the small CNN on Fashion-MNIST with
# I-TiMePReSt on 4 pipeline stages in the emulator (default settings).
# Extra arguments go to `timeprest train` (e.g. --method v-timeprest --epochs 5).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -e /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1; then
  SUDO=""
  if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
  ($SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist) \
    || echo "note: could not install dataset-fashion-mnist with apt; timeprest will try to download the data"
fi
bash scripts/setup.sh
exec .venv/bin/timeprest train "$@"
