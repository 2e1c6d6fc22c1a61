#!/usr/bin/env bash
# Idempotent: make sure promtool (Debian's prometheus package) is on PATH for the alert/recording rule unit
# tests (tests/test_prometheus_rules.py). CI runs as root; elsewhere, without it, those tests skip with the
# reason (OODGUARD_REQUIRE_PROMTOOL=1 makes that a failure).
set -euo pipefail
if command -v promtool >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" != "0" ]; then
    echo "setup_prometheus.sh: promtool is missing and this is not root: install the prometheus package" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update
# the package may start a system prometheus where an init system runs; the tests only use promtool
apt-get install -y --no-install-recommends prometheus
command -v promtool
