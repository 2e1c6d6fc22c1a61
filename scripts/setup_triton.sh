#!/usr/bin/env bash
# Sets up (idempotent) the environment the integration tests use to run a real tritonserver on a CPU:
#   .venv-triton/  python3 -m venv with numpy<2 + onnxruntime (what model.py imports inside the server) and
#                  nvidia-pytriton (installed --no-deps: only for its tritonserver binary and python backend).
# The python backend stub for this interpreter's version is copied next to libtriton_python.so.
# Why each piece is needed: oodguard/triton_local.py (and README, "Serving"). Start the server with
# `bash scripts/triton.sh --repository DIR`. Override the location with OODGUARD_TRITON_ENV.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
ENV_DIR=${OODGUARD_TRITON_ENV:-$PWD/.venv-triton}
PYTRITON_VERSION=0.7.0

[ -x "$ENV_DIR/bin/python" ] || "$PYTHON" -m venv "$ENV_DIR"
PY="$ENV_DIR/bin/python"
# numpy 2 makes every python-backend response come back empty; onnxruntime 1.20.1 has cp311 wheels built
# for numpy 1.x and 2.x.
# (pytriton is located with find_spec, never imported: its own dependencies are deliberately not installed.)
READY='import importlib.util as u, sys, numpy, onnxruntime; sys.exit(int(numpy.__version__.split(".")[0]) >= 2 or u.find_spec("pytriton") is None)'
quiet() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
if ! "$PY" -c "$READY" 2>/dev/null; then
    quiet "$PY" -m pip install -q "numpy<2" "onnxruntime==1.20.1"
    # Its dependencies pin old versions of packages this environment does not need.
    quiet "$PY" -m pip install -q --no-deps "nvidia-pytriton==$PYTRITON_VERSION"
    "$PY" -c "$READY"
fi

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
