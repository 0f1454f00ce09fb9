# Sourced by test.sh and demo.sh from the repository root: creates .venv if absent, activates it and installs
# ldm-vae with the extra named by $1. On this machine pip takes torch 2.14.1 / torchvision 0.29.1 from local
# files (lpips imports torchvision; the CPU torch 2.13.0 file cannot be paired with any torchvision here).
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
python -m pip install -q -e ".[$1]"
