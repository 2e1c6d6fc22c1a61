#!/usr/bin/env bash
# Runs the local CPU tritonserver (the nvidia-pytriton wheel's Triton 2.51 in .venv-triton, its python backend,
# the CPU configs) on a model repository in the foreground, on 127.0.0.1:8001 (gRPC) / 8000 (HTTP) / 8002
# (metrics). Usage: bash scripts/triton.sh --repository model_repository [--grpc-port N ...]
# Then: oodguard serve --backend triton --triton-url 127.0.0.1:8001 --repository model_repository
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >/dev/null
bash scripts/setup_triton.sh >/dev/null
exec .venv/bin/oodguard triton "$@"
