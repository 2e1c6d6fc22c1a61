#!/usr/bin/env bash
# The README's main command: set up, build + export the digits demo model (once), start the gateway with
# the embedded ONNX Runtime backend, show a client call of an in-distribution digit and of an OOD input,
# then keep serving until Ctrl-C. LISTEN (default 127.0.0.1:50051) and OODGUARD_* settings apply.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
LISTEN=${LISTEN:-127.0.0.1:50051}

if [ -z "$(ls -d model_repository/digits/[0-9]* 2>/dev/null)" ]; then
    oodguard export --demo digits --repository model_repository
fi
oodguard validate-repo model_repository

mkdir -p runs
log=runs/demo-gateway.log
: > "$log"
# the gateway's log (stderr) shows here and is kept in $log
oodguard serve --repository model_repository --listen "$LISTEN" --backend embedded \
    --queue-path runs/demo-queue.sqlite 2> >(tee "$log" >&2) &
server=$!
# stop the gateway however this script ends (Ctrl-C, a failing client, set -e): no orphan holds the port
trap 'kill -TERM $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT
trap 'exit 130' INT TERM
# the client calls only the gateway this script started: it must still run and have logged that it listens (it
# binds the port without SO_REUSEPORT, so no other process shares it), and health must say SERVING
ready=0
for _ in $(seq 1 300); do
    if ! kill -0 "$server" 2>/dev/null; then
        echo "demo: the gateway exited before serving (its error is above); nothing was called" >&2
        exit 1
    fi
    if grep -q "listening on" "$log" && python - "$LISTEN" <<'PY'
import sys, grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
try:
    with grpc.insecure_channel(sys.argv[1]) as ch:
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1).status
    sys.exit(0 if status == health_pb2.HealthCheckResponse.SERVING else 1)
except grpc.RpcError:
    sys.exit(1)
PY
    then
        ready=1
        break
    fi
    sleep 0.2
done
[ "$ready" = 1 ] || { echo "demo: the gateway did not become SERVING within 60 s (log: $log)" >&2; exit 1; }
python -m oodguard.clients.demo_client --target "$LISTEN" --model digits
echo "gateway serving on $LISTEN (Ctrl-C to stop); the OOD input is in the query queue runs/demo-queue.sqlite:"
echo "  oodguard queue stats --queue sqlite:///runs/demo-queue.sqlite"
echo "  oodguard harvest --queue sqlite:///runs/demo-queue.sqlite --model digits --strategy sisom-diverse --budget 10 --out runs/demo-harvest"
wait $server
