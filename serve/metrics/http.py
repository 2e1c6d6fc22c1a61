"""The ``/metrics`` endpoint: plain HTTP or HTTPS, optionally behind HTTP basic auth, each connection with a
timeout (a stuck scraper cannot hold a thread)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import socket
import ssl
import threading
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any, Callable, Iterable
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import CollectorRegistry, make_wsgi_app

from .definitions import HTTP_TIMEOUT_S

log = logging.getLogger("oodguard.serve.metrics")


class QuietHandler(WSGIRequestHandler):
    timeout = HTTP_TIMEOUT_S  # a client that stalls mid-request frees its thread

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        """No access log."""


class MetricsServer(ThreadingMixIn, WSGIServer):
    """A thread-per-connection WSGI server, as prometheus_client's, except that with TLS the handshake runs in
    the connection's own thread (prometheus_client's runs it in the accept loop, where one client that
    connects and stays silent blocks every scrape)."""

    daemon_threads = True

    def __init__(self, address: tuple, family: socket.AddressFamily, tls: ssl.SSLContext | None):
        self.address_family, self.tls = family, tls
        super().__init__(address, QuietHandler)

    def finish_request(self, request: socket.socket, client_address: Any) -> None:
        if self.tls is None:
            return super().finish_request(request, client_address)
        request.settimeout(HTTP_TIMEOUT_S)
        try:
            request = self.tls.wrap_socket(request, server_side=True)
        except OSError as exc:  # ssl.SSLError included: plain HTTP, a bad or silent client
            log.debug("metrics: TLS handshake with %s failed: %s", client_address, exc)
            return
        try:
            super().finish_request(request, client_address)
        finally:
            self.shutdown_request(request)


def load_basic_auth(path: str | Path) -> bytes:
    """The ``user:password`` of an auth file (one line, UTF-8), as the bytes basic auth encodes."""
    lines = [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line]
    user, _, password = lines[0].partition(":") if len(lines) == 1 else ("", "", "")
    if not (user and password):
        raise ValueError(f"metrics auth file {path}: expected one line 'user:password'")
    return lines[0].encode("utf-8")


def basic_auth(app: Callable, credentials: bytes, realm: str = "oodguard metrics") -> Callable:
    """WSGI middleware: ``app`` for requests with HTTP basic auth ``credentials`` (``user:password``), 401
    otherwise. Compares SHA-256 digests in constant time (neither content nor length leaks)."""
    expected = hashlib.sha256(credentials).digest()
    challenge = ("WWW-Authenticate", f'Basic realm="{realm}", charset="UTF-8"')

    def guarded(environ: dict, start_response: Callable) -> Iterable[bytes]:
        scheme, _, token = environ.get("HTTP_AUTHORIZATION", "").partition(" ")
        try:
            given = base64.b64decode(token.strip(), validate=True)
        except ValueError:  # binascii.Error and non-ASCII text
            given = b""
        if scheme.lower() == "basic" and hmac.compare_digest(hashlib.sha256(given).digest(), expected):
            return app(environ, start_response)
        start_response("401 Unauthorized", [challenge, ("Content-Type", "text/plain; charset=utf-8")])
        return [b"401 Unauthorized\n"]

    return guarded


def start_metrics_server(port: int, host: str = "0.0.0.0", registry: CollectorRegistry | None = None,
                         tls_cert: str | Path | None = None, tls_key: str | Path | None = None,
                         auth_file: str | Path | None = None) -> tuple[MetricsServer, threading.Thread]:
    """Serve the metrics of ``registry`` (default: prometheus_client's global one) on ``host:port`` (``""``:
    every interface; ``[::1]`` style accepted) in a daemon thread: HTTPS with ``tls_cert`` + ``tls_key`` (PEM),
    HTTP basic auth with ``auth_file`` (:func:`load_basic_auth`). Returns ``(server, thread)``
    (``server.shutdown()`` stops it). Bad TLS or auth files raise before anything listens."""
    from prometheus_client import REGISTRY

    if bool(tls_cert) != bool(tls_key):
        raise ValueError("metrics TLS needs both a certificate and a key")
    app = make_wsgi_app(REGISTRY if registry is None else registry)
    if auth_file:
        app = basic_auth(app, load_basic_auth(auth_file))
        if not tls_cert:
            log.warning("metrics basic auth without TLS: the password crosses the network in clear text")
    tls = None
    if tls_cert:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(str(tls_cert), str(tls_key))
    host = host.strip("[]") or "0.0.0.0"
    family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    server = MetricsServer(address, family, tls)
    server.set_app(app)
    thread = threading.Thread(target=server.serve_forever, name="oodguard-metrics-http", daemon=True)
    thread.start()
    return server, thread
