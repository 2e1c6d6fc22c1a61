#!/usr/bin/env bash
# Regenerates every lock file in locks/ from its inputs: exact versions of every transitive dependency, with the
# hashes of each release's files, resolved by uv for this machine (CPython 3.11, Linux x86_64; CI and the gateway image match it). Run it after changing the
# dependencies in pyproject.toml or a locks/*.in file, then commit the locks (tests/test_locks.py fails while
# pyproject.toml and the locks disagree). `bash scripts/lock.sh --upgrade` moves every package to its newest
# allowed release; without it, versions already locked are kept where the inputs still allow them.
#
#   locks/dev.txt                      .venv: pyproject's base + [export,dev,bench] extras, torch's CPU build
#   locks/gateway-onnxruntime.txt      the gateway image (Dockerfile), CPU: the base dependencies only
#   locks/gateway-onnxruntime-gpu.txt  the gateway image with onnxruntime-gpu in place of onnxruntime
#   locks/triton.txt (+ -no-deps.txt)  .venv-triton: the CPU tritonserver's python-backend environment
#   locks/label-studio.txt             .venv-label-studio: the Label Studio server of the integration tests
#   locks/build.txt                    setuptools, oodguard's build backend (a build constraint everywhere)
#   locks/uv.txt                       uv itself (scripts/uv.sh installs it with pip, hashes checked)
# TORCH_FIND_LINKS (default /opt/wheels): a folder or page holding the torch==2.13.0+cpu wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
UV=$(bash scripts/uv.sh)
TORCH_FIND_LINKS=${TORCH_FIND_LINKS:-/opt/wheels}
upgrade=()
case "${1:-}" in
    "") ;;
    --upgrade) upgrade=(--upgrade) ;;
    *) echo "usage: bash scripts/lock.sh [--upgrade]" >&2; exit 2 ;;
esac
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

compile() {  # compile OUTPUT INPUT... [uv options]
    local out=$1; shift
    echo "lock: $out" >&2
    "$UV" pip compile --quiet --generate-hashes --python-version 3.11 ${upgrade[@]+"${upgrade[@]}"} \
        --custom-compile-command "bash scripts/lock.sh" -o "$out" "$@"
}

compile locks/uv.txt locks/uv.in
compile locks/build.txt locks/build.in
compile locks/dev.txt pyproject.toml locks/dev.in --extra export --extra dev --extra bench \
    --find-links "$TORCH_FIND_LINKS"
for ort in onnxruntime onnxruntime-gpu; do
    python3 scripts/docker_requirements.py pyproject.toml "$ort" > "$tmp/gateway-$ort.in"
    compile "locks/gateway-$ort.txt" "$tmp/gateway-$ort.in"
    # the temporary input's path is no use to a reader: name what it was made from
    sed -i "s|-r $tmp/gateway-$ort.in|pyproject.toml (base dependencies, $ort)|" "locks/gateway-$ort.txt"
done
compile locks/triton.txt locks/triton.in
compile locks/triton-no-deps.txt locks/triton-no-deps.in --no-deps
compile locks/label-studio.txt locks/label-studio.in
echo "lock: done; commit locks/" >&2
