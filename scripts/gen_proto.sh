#!/usr/bin/env bash
# Regenerate the gateway's Python stubs from serve/proto/oodguard/v1/oodguard.proto.
# Usage: scripts/gen_proto.sh [OUT_DIR]   (default: serve/v1, imported as oodguard.serve.v1)
# Needs grpcio-tools (pip install ".[dev]"); PYTHON picks the interpreter (default: python).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="$(mkdir -p "${1:-$root/serve/v1}" && cd "${1:-$root/serve/v1}" && pwd)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
"${PYTHON:-python}" -m grpc_tools.protoc -I "$root/serve/proto" \
  --python_out="$tmp" --pyi_out="$tmp" --grpc_python_out="$tmp" oodguard/v1/oodguard.proto
# protoc writes absolute imports ("from oodguard.v1 import oodguard_pb2"), which would resolve against
# the oodguard package itself; the stubs live in oodguard.serve.v1, so make them relative.
sed -i 's/^from oodguard\.v1 import oodguard_pb2 as /from . import oodguard_pb2 as /' "$tmp/oodguard/v1/oodguard_pb2_grpc.py"
for name in oodguard_pb2.py oodguard_pb2.pyi oodguard_pb2_grpc.py; do
  cp "$tmp/oodguard/v1/$name" "$out/$name"
done
