#!/usr/bin/env bash
# Sets up (idempotent) the Label Studio server the integration tests import harvests into and export from:
#   .venv-label-studio/  python3 -m venv with label-studio (~1 GB; a few minutes the first time).
# It is a separate environment: label-studio pins Django and many other packages the project must not get.
# tests/label_studio_fixtures.py starts `label-studio start` from it. Override the location with
# OODGUARD_LABEL_STUDIO_ENV.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
ENV_DIR=${OODGUARD_LABEL_STUDIO_ENV:-$PWD/.venv-label-studio}
LABEL_STUDIO_VERSION=1.23.2

[ -x "$ENV_DIR/bin/python" ] || "$PYTHON" -m venv "$ENV_DIR"
PY="$ENV_DIR/bin/python"
quiet() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
READY="import importlib.metadata as m, sys; sys.exit(m.version('label-studio') != '$LABEL_STUDIO_VERSION')"
if ! "$PY" -c "$READY" 2>/dev/null || [ ! -x "$ENV_DIR/bin/label-studio" ]; then
    quiet "$PY" -m pip install -q "label-studio==$LABEL_STUDIO_VERSION"
    "$PY" -c "$READY"
fi

echo "label-studio env: $ENV_DIR"
echo "label-studio:     $ENV_DIR/bin/label-studio ($LABEL_STUDIO_VERSION)"
