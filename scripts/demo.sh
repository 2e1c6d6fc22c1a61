#!/usr/bin/env bash
# The README's main command: set up, then build, export and evaluate the digits demo model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
oodguard export --demo digits --repository model_repository
oodguard validate-repo model_repository
