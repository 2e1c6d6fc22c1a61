#!/usr/bin/env bash
# Idempotent: make sure redis-server (Debian package) is on PATH for the Redis queue tests. CI runs as root;
# elsewhere, without it, those tests skip with the reason (OODGUARD_REQUIRE_REDIS=1 makes that a failure).
set -euo pipefail
if command -v redis-server >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" != "0" ]; then
    echo "setup_redis.sh: redis-server is missing and this is not root: install the redis-server package" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update
apt-get install -y --no-install-recommends redis-server
# the package may start a system instance where an init system runs; the tests start their own servers
command -v redis-server
