#!/usr/bin/env bash
# The README's test command: set up (idempotent: .venv, and .venv-triton for the real-tritonserver tests),
# then run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/setup_triton.sh
. .venv/bin/activate
python -m pytest "$@"
