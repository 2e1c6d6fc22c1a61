#!/usr/bin/env bash
# Creates .venv with everything oodguard needs (CPU): torch for export, the serving stack, test tools, exactly
# as locks/dev.txt pins them (every transitive dependency, hashes checked; scripts/lock.sh regenerates it), then
# oodguard itself in editable mode. uv installs (scripts/uv.sh puts the locked release in .tools/).
# TORCH_FIND_LINKS (default /opt/wheels): a folder or page holding the torch==2.13.0+cpu wheel the lock names.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_FIND_LINKS=${TORCH_FIND_LINKS:-/opt/wheels}
# Nothing to do when this script, pyproject.toml and the lock are what the last successful run installed from
# (FORCE=1 reinstalls anyway).
stamp=.venv/.oodguard-setup
want=$(cat scripts/setup.sh pyproject.toml locks/dev.txt | sha256sum | cut -d' ' -f1)
if [ "${FORCE:-0}" != 1 ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && .venv/bin/python -c "import oodguard, torch" 2>/dev/null; then
    echo "setup: .venv is up to date (FORCE=1 bash scripts/setup.sh reinstalls)"
    exit 0
fi
UV=$(bash scripts/uv.sh)
[ -x .venv/bin/python ] || "$UV" venv --quiet --python "$PYTHON" .venv
# sync: the environment becomes exactly the lock (anything else installed there is removed)
"$UV" pip sync --quiet --python .venv/bin/python --require-hashes --find-links "$TORCH_FIND_LINKS" locks/dev.txt
# oodguard itself, built with the locked setuptools already in .venv (no unpinned build environment)
"$UV" pip install --quiet --python .venv/bin/python --no-deps --no-build-isolation -e .
echo "$want" > "$stamp"
echo "setup: .venv installed from locks/dev.txt"
