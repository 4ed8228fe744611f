#!/usr/bin/env bash
# Set up nvsm in ./.venv on a fresh Linux x86-64 machine: CPU-usable torch 2.12 stack,
# pytorch3d (prebuilt for exactly torch 2.12), faiss-cpu and the test tools.
# Other platforms: install any torch >= 2.2 first, then `pip install -e ".[test]"`
# (nvsm then renders with its pure-torch rasteriser).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.12.0 torchvision==0.27.0
.venv/bin/python -m pip install -q -e ".[pytorch3d,test,lite12]"
