#!/usr/bin/env bash
# The one-command demo: creates .venv if absent, installs ldm-vae (with scikit-image for the bundled photos),
# and runs `ldm-vae demo -o OUT_DIR` on the shipped weights. No network needed beyond the package installs.
#   scripts/demo.sh [-o OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out="demo-output"
while [ $# -gt 0 ]; do
    case "$1" in
        -o|--output) out="$2"; shift 2 ;;
        *) echo "usage: scripts/demo.sh [-o OUT_DIR]" >&2; exit 2 ;;
    esac
done
. scripts/venv.sh demo
exec ldm-vae demo -o "$out"
