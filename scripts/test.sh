#!/usr/bin/env bash
# The project's test command: creates .venv if absent, installs ldm-vae with [dev], runs ruff and the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/venv.sh dev
ruff check .
ruff format --check .
exec python -m pytest -q "$@"
