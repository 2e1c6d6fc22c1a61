#!/usr/bin/env bash
# Creates .venv with everything oodguard needs (CPU): torch for export, the serving stack, test tools.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
# Nothing to do when this script and pyproject.toml are what the last successful run installed from
# (FORCE=1 reinstalls anyway).
stamp=.venv/.oodguard-setup
want=$(cat scripts/setup.sh pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "${FORCE:-0}" != 1 ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && python -c "import oodguard, torch" 2>/dev/null; then
    echo "setup: .venv is up to date (FORCE=1 bash scripts/setup.sh reinstalls)"
    exit 0
fi
python -m pip install -q --upgrade pip
# Pin the CPU wheel first: an unpinned torch would pull several GB of CUDA packages.
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[export,dev,bench]"
echo "$want" > "$stamp"
