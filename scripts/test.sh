#!/usr/bin/env bash
# The project's test command: creates .venv if absent, installs ldm-vae with [dev], runs the suite.
# On this machine pip takes torch 2.14.1 / torchvision 0.29.1 from local files (lpips imports torchvision).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
python -m pip install -q -e ".[dev]"
ruff check .
ruff format --check .
exec python -m pytest -q "$@"
