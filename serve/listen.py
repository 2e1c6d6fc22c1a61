"""Whether the gateway's listen address is free, asked before gRPC binds it.

gRPC's own failure to bind is a RuntimeError after a C-core log line, and with ``SO_REUSEPORT`` (the workers of
``--workers N``) a second gateway could even share a port another gateway holds. A plain bind, without
``SO_REUSEPORT``, fails on any port another socket holds, so the start is refused with one line naming it.
"""

from __future__ import annotations

import socket


def port_in_use_message(listen: str, detail: str = "") -> str:
    why = f" ({detail})" if detail else ""
    return (f"cannot listen on {listen}: the port is in use (another gateway?) or the address is not this host's{why}; "
            "stop the other process or give --listen HOST:PORT")


def ensure_port_free(listen: str) -> None:
    """Raise OSError naming ``listen`` (HOST:PORT) when it cannot be bound now; port 0 always can."""
    host, _, port = listen.rpartition(":")
    if not port.isdigit() or int(port) == 0:
        return
    try:
        infos = socket.getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise OSError(port_in_use_message(listen, exc.strerror)) from exc
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        try:
            probe.bind(address)
        except OSError as exc:
            raise OSError(port_in_use_message(listen, exc.strerror)) from exc
