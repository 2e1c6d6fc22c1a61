#!/usr/bin/env bash
# Creates .venv with everything oodguard needs (CPU): torch for export, the serving stack, test tools.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# Pin the CPU wheel first: an unpinned torch would pull several GB of CUDA packages.
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[export,dev,bench]"
