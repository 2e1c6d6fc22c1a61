#!/usr/bin/env bash
# Sets up (idempotent) the Label Studio server the integration tests import harvests into and export from:
#   .venv-label-studio/  label-studio and every package it needs, exactly as locks/label-studio.txt pins them
#                        (~1 GB; a minute or two the first time).
# It is a separate environment: label-studio pins Django and many other packages the project must not get.
# tests/label_studio_fixtures.py starts `label-studio start` from it. Override the location with
# OODGUARD_LABEL_STUDIO_ENV.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
ENV_DIR=${OODGUARD_LABEL_STUDIO_ENV:-$PWD/.venv-label-studio}
PY="$ENV_DIR/bin/python"
LABEL_STUDIO_VERSION=$(grep -Eo '^label-studio==[^ ]+' locks/label-studio.txt | cut -d= -f3)
READY="import importlib.metadata as m, sys; sys.exit(m.version('label-studio') != '$LABEL_STUDIO_VERSION')"
stamp="$ENV_DIR/.oodguard-setup"
want=$(cat scripts/setup_label_studio.sh locks/label-studio.txt | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || ! "$PY" -c "$READY" 2>/dev/null || [ ! -x "$ENV_DIR/bin/label-studio" ]; then
    UV=$(bash scripts/uv.sh)
    [ -x "$PY" ] || "$UV" venv --quiet --python "$PYTHON" "$ENV_DIR"
    "$UV" pip sync --quiet --python "$PY" --require-hashes locks/label-studio.txt
    "$PY" -c "$READY"
    echo "$want" > "$stamp"
fi

echo "label-studio env: $ENV_DIR"
echo "label-studio:     $ENV_DIR/bin/label-studio ($LABEL_STUDIO_VERSION)"
