"""Container health check: ask the gateway's standard gRPC health service; exit 0 when SERVING, 1 otherwise.

    python -m oodguard.clients.healthcheck [--target HOST:PORT] [--service NAME] [--timeout S]

The default target is 127.0.0.1 at the port of ``OODGUARD_LISTEN`` (50051 when unset), so the image's
HEALTHCHECK follows the listen address it was started with. ``--service ""`` (the default) is the server's
overall health; ``oodguard.v1.OODGuard`` is the prediction service. Optional TLS (``--tls-ca``, or
``OODGUARD_HEALTHCHECK_TLS_CA``) and bearer token (``OODGUARD_HEALTHCHECK_TOKEN``).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def default_target(env: dict | None = None) -> str:
    env = os.environ if env is None else env
    port = env.get("OODGUARD_LISTEN", "").rpartition(":")[2]
    return f"127.0.0.1:{port if port.isdigit() and port != '0' else 50051}"


def check(target: str, service: str = "", timeout: float = 3.0, tls_ca: str | None = None,
          token: str | None = None) -> tuple[bool, str]:
    """(serving, what was seen)."""
    options = [("grpc.enable_http_proxy", 0)]
    if tls_ca:
        channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(Path(tls_ca).read_bytes()), options)
    else:
        channel = grpc.insecure_channel(target, options)
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    with channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout, metadata=metadata)
        except grpc.RpcError as exc:
            return False, f"{exc.code().name}: {exc.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    return response.status == health_pb2.HealthCheckResponse.SERVING, status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default=default_target(), help="gateway address (default %(default)s)")
    parser.add_argument("--service", default="", help="health service name ('' = the whole server)")
    parser.add_argument("--timeout", type=float, default=3.0, help="deadline, seconds")
    parser.add_argument("--tls-ca", default=os.environ.get("OODGUARD_HEALTHCHECK_TLS_CA") or None,
                        help="root certificate (PEM) when the gateway serves TLS")
    args = parser.parse_args(argv)
    serving, seen = check(args.target, args.service, args.timeout, args.tls_ca,
                          os.environ.get("OODGUARD_HEALTHCHECK_TOKEN") or None)
    print(f"{args.target} {args.service or '(server)'}: {seen}")
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main())
