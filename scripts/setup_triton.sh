#!/usr/bin/env bash
# Sets up (idempotent) the environment the integration tests use to run a real tritonserver on a CPU:
#   .venv-triton/  numpy<2 + onnxruntime (what model.py imports inside the server), exactly as locks/triton.txt
#                  pins them, and nvidia-pytriton (locks/triton-no-deps.txt, without its dependencies: only for
#                  its tritonserver binary and python backend; never imported).
# The python backend stub for this interpreter's version is copied next to libtriton_python.so.
# Why each piece is needed: oodguard/triton_local.py (and docs/operations.md, "Serving"). Start the server with
# `bash scripts/triton.sh --repository DIR`. Override the location with OODGUARD_TRITON_ENV.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
ENV_DIR=${OODGUARD_TRITON_ENV:-$PWD/.venv-triton}
PY="$ENV_DIR/bin/python"
# numpy 2 makes every python-backend response come back empty (locks/triton.in says why the pins are what they are).
# (pytriton is located with find_spec, never imported: its own dependencies are deliberately not installed.)
READY='import importlib.util as u, sys, numpy, onnxruntime; sys.exit(int(numpy.__version__.split(".")[0]) >= 2 or u.find_spec("pytriton") is None)'
stamp="$ENV_DIR/.oodguard-setup"
want=$(cat scripts/setup_triton.sh locks/triton.txt locks/triton-no-deps.txt | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || ! "$PY" -c "$READY" 2>/dev/null; then
    UV=$(bash scripts/uv.sh)
    [ -x "$PY" ] || "$UV" venv --quiet --python "$PYTHON" "$ENV_DIR"
    "$UV" pip sync --quiet --python "$PY" --require-hashes locks/triton.txt locks/triton-no-deps.txt
    "$PY" -c "$READY"
    echo "$want" > "$stamp"
fi

# model.py's bytecode goes to $ENV_DIR/pycache, not into <version>/__pycache__ (which would litter the model
# repository and make Triton's repository poll reload the version once more). The python backend stub runs an
# isolated interpreter that ignores PYTHON* variables, but it reads this environment's .pth files at start.
SITE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "import sys; sys.pycache_prefix = sys.pycache_prefix or '$ENV_DIR/pycache'" > "$SITE/oodguard_pycache.pth"

PY_VERSION=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
TRITON_DIR=$("$PY" -c 'import importlib.util as u; print(u.find_spec("pytriton").submodule_search_locations[0] + "/tritonserver")')
STUB="$TRITON_DIR/python_backend_stubs/$PY_VERSION/triton_python_backend_stub"
[ -f "$STUB" ] || { echo "no python backend stub for Python $PY_VERSION in $TRITON_DIR" >&2; exit 1; }
cmp -s "$STUB" "$TRITON_DIR/backends/python/triton_python_backend_stub" ||
    install -m 0755 "$STUB" "$TRITON_DIR/backends/python/triton_python_backend_stub"

echo "triton env:     $ENV_DIR"
echo "tritonserver:   $TRITON_DIR/bin/tritonserver"
echo "backends:       $TRITON_DIR/backends"
echo "python libdir:  $("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("LIBDIR"))')"
