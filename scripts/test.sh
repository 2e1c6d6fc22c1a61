#!/usr/bin/env bash
# The README's test command: set up (idempotent: .venv; .venv-triton for the real-tritonserver tests;
# Debian's redis-server and prometheus (promtool) for the queue and alert-rule tests; .venv-label-studio for
# the real-Label-Studio tests), then run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/setup_triton.sh
bash scripts/setup_redis.sh
bash scripts/setup_prometheus.sh
bash scripts/setup_label_studio.sh
. .venv/bin/activate
python -m pytest "$@"
