#!/usr/bin/env bash
# Prints the path of the uv every set-up script installs with, installing it first when missing (idempotent):
# .tools/uv/bin/uv, the release pinned in locks/uv.txt, put there by pip with its hashes checked. PYTHON picks the
# interpreter pip runs under (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
UV=$PWD/.tools/uv/bin/uv
want=$(grep -Eo '^uv==[^ ]+' locks/uv.txt | cut -d= -f3)
if [ ! -x "$UV" ] || [ "$("$UV" --version 2>/dev/null | cut -d' ' -f2)" != "$want" ]; then
    rm -rf .tools/uv
    "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-deps --require-hashes --target .tools/uv \
        -r locks/uv.txt 2> >(grep -v -e "is ignored: it is neither a file nor a directory" -e "Running pip as the 'root' user" >&2)
fi
echo "$UV"
