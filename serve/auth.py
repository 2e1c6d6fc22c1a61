"""Transport security of the gateway: TLS / mutual TLS credentials and bearer-token authentication.

- TLS: ``tls_cert`` + ``tls_key`` (PEM files) make the gateway listen with TLS only; ``tls_client_ca``
  (a PEM bundle) additionally requires every client to present a certificate signed by one of those CAs
  (mutual TLS). The files are read at start-up; a rotated certificate needs a restart.
- Token: ``auth_token`` (or, better, ``auth_token_file``, which keeps the secret out of the process list
  and the environment) makes every call carry the gRPC metadata ``authorization: Bearer <token>``;
  a call without it, or with another token, ends with ``UNAUTHENTICATED``. The comparison is constant-time
  (:func:`hmac.compare_digest`). The standard health service (``grpc.health.v1.Health``) stays open so
  that load balancers and orchestrators can probe without the secret; it reveals only SERVING /
  NOT_SERVING. Reflection needs the token like the OODGuard service. A token without TLS travels in
  clear text: the gateway logs a warning.
"""

from __future__ import annotations

import hmac
import logging
from pathlib import Path
from typing import Awaitable, Callable

import grpc

log = logging.getLogger("oodguard.serve.auth")

#: methods callable without the token (prefix match on the full method name)
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)
AUTH_HEADER = "authorization"
SCHEME = "bearer"


def load_token(auth_token: str = "", auth_token_file: Path | str | None = None) -> str | None:
    """The configured token (``auth_token``, else the stripped content of ``auth_token_file``), or None."""
    if auth_token:
        return auth_token
    if auth_token_file:
        path = Path(auth_token_file)
        try:
            token = path.read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise OSError(f"auth_token_file {path}: cannot read the token ({exc})") from exc
        if not token:
            raise OSError(f"auth_token_file {path} is empty")
        return token
    return None


def _read(path: Path | str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise OSError(f"{what} {path}: cannot read ({exc.strerror or exc})") from exc


def server_credentials(tls_cert: Path | str | None, tls_key: Path | str | None,
                       tls_client_ca: Path | str | None = None) -> grpc.ServerCredentials | None:
    """TLS server credentials (mutual TLS when ``tls_client_ca`` is given), or None without a certificate."""
    if not tls_cert:
        return None
    chain = _read(tls_cert, "tls_cert")
    key = _read(tls_key, "tls_key") if tls_key else None
    if key is None:
        raise OSError("tls_cert is set but tls_key is not")
    roots = _read(tls_client_ca, "tls_client_ca") if tls_client_ca else None
    return grpc.ssl_server_credentials([(key, chain)], root_certificates=roots, require_client_auth=roots is not None)


def _bearer(metadata) -> str | None:
    for item in metadata or ():
        key, value = item[0], item[1]
        if key.lower() == AUTH_HEADER:
            if isinstance(value, bytes):
                value = value.decode("latin-1")
            return value
    return None


def check_token(header: str | None, token: str) -> str | None:
    """None when ``header`` is ``Bearer <token>``; else the failure reason (``missing`` or ``invalid``)."""
    if header is None:
        return "missing"
    scheme, _, presented = header.strip().partition(" ")
    # compare whatever was presented, so a wrong scheme costs the same time as a wrong token
    same = hmac.compare_digest(presented.strip().encode("utf-8", "surrogateescape"), token.encode("utf-8"))
    return None if same and scheme.lower() == SCHEME else "invalid"


def _deny(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of ``handler``'s kind that ends the call with UNAUTHENTICATED."""

    async def abort(request_or_iterator, context: grpc.aio.ServicerContext):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    kwargs = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort, **kwargs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort, **kwargs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort, **kwargs)
    return grpc.unary_unary_rpc_method_handler(abort, **kwargs)


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every call (except the open health service) without ``authorization: Bearer <token>``."""

    def __init__(self, token: str, on_failure: Callable[[str], None] | None = None,
                 open_prefixes: tuple[str, ...] = OPEN_METHOD_PREFIXES):
        if not token:
            raise ValueError("the auth token is empty")
        self._token = token
        self._on_failure = on_failure
        self._open = open_prefixes

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
                                handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method = handler_call_details.method or ""
        handler = await continuation(handler_call_details)
        if handler is None or method.startswith(self._open):
            return handler
        reason = check_token(_bearer(handler_call_details.invocation_metadata), self._token)
        if reason is None:
            return handler
        if self._on_failure is not None:
            self._on_failure(reason)
        text = ("missing 'authorization: Bearer <token>' metadata" if reason == "missing"
                else "invalid credentials in 'authorization' metadata")
        return _deny(handler, text)


__all__ = ["TokenAuthInterceptor", "server_credentials", "load_token", "check_token", "OPEN_METHOD_PREFIXES"]
