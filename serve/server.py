"""The gateway process: it assembles the parts (backend, registry of served versions, query queue, metrics, the
request path :class:`~oodguard.serve.pipeline.PredictPipeline` and its gRPC service :mod:`oodguard.serve.service`,
standard health and reflection) and runs their lifecycle: security, bind, start, health, drain. It does no
per-request work itself. Never imports torch.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import signal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from oodguard.queues.base import QueryQueue
from oodguard.queues.factory import describe_url

from .auth import TokenAuthInterceptor, load_token, server_credentials
from .backend import Backend
from .batching import MicroBatcher
from .decision import DecisionPolicy, PolicyError
from .listen import ensure_port_free, port_in_use_message
from .metrics import GatewayMetrics
from .pipeline import PredictPipeline
from .registry import Registry, describe
from .service import SERVICE_NAME, OODGuardService
from .settings import Settings, WorkerSlot

log = logging.getLogger("oodguard.serve")


def build_backend(settings: Settings) -> Backend:
    """The backend named by ``settings.backend``; the Triton one is imported only when chosen."""
    if settings.backend == "embedded":
        from .embedded import EmbeddedBackend

        return EmbeddedBackend(settings.repository, poll_interval_s=settings.poll_interval_s,
                               intra_op_threads=settings.intra_op_threads)
    if settings.backend == "triton":
        from .triton_backend import TritonBackend

        return TritonBackend(settings.triton_url, settings.repository,
                             max_inflight_batches=settings.triton_inflight_batches)
    raise ValueError(f"unknown backend {settings.backend!r}")


def build_queue(settings: Settings, worker: WorkerSlot | None = None) -> QueryQueue:
    """The queue named by ``settings.queue_url`` (else the SQLite file ``settings.queue_path``); a worker's own
    spool file for a Redis queue."""
    from oodguard.queues.factory import open_queue

    slot = worker or WorkerSlot(0, 1)
    return open_queue(settings.effective_queue_url, max_size=settings.queue_max_size,
                      max_bytes=settings.queue_max_bytes, full_policy=settings.queue_full_policy,
                      spool_path=settings.queue_spool_path, worker=slot.index, workers=slot.count,
                      idempotency_window_s=settings.queue_idempotency_window_s)


def _loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address) is this machine's loopback: only local processes reach it."""
    name = host.strip("[]")
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def server_options(max_message_bytes: int, share_port: bool = False) -> list[tuple[str, int]]:
    """gRPC server options of the gateway: the message size limit both ways; the port is shared
    (``SO_REUSEPORT``) only by the workers of one ``--workers`` gateway, never by accident."""
    return [("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.so_reuseport", 1 if share_port else 0)]


class Gateway:
    """Owns the gRPC server, the backend, the registry and the queue. ``start`` → ``port``; ``stop`` drains.
    ``worker``: this gateway is one of the workers of ``--workers N`` (shared port, multiprocess metrics, the
    metrics endpoint in worker 0 only)."""

    def __init__(self, settings: Settings, backend: Backend | None = None, queue: QueryQueue | None = None,
                 worker: WorkerSlot | None = None):
        self.settings = settings
        self.worker = worker
        self.policy = DecisionPolicy(tuple(settings.decision_scores), settings.decision_mode,
                                     settings.effective_decision_fallback)
        self.backend = backend if backend is not None else build_backend(settings)
        self.queue = queue if queue is not None else build_queue(settings, worker)
        self.registry = Registry(self.backend, settings.repository, self.policy, settings.poll_interval_s,
                                 settings.max_batch, settings.default_model, on_state=self._on_registry_state,
                                 input_range_margin=settings.input_range_margin)
        self.health = health.aio.HealthServicer()
        self.port: int | None = None
        self.server: grpc.aio.Server | None = None
        self._serving: bool | None = None
        self.metrics = GatewayMetrics(multiprocess=worker is not None)
        self.pipeline = PredictPipeline(settings, self.backend, self.registry, self.queue, self.metrics,
                                        on_backend_failed=self.backend_failed, on_backend_ok=self.backend_ok)
        self.metrics.bind(self)
        self._sync: asyncio.Task | None = None
        # the embedded backend runs small single rows inline only while no other call is in progress
        self.backend.inline_allowed = lambda: self.pipeline.active_requests <= 1
        self.metrics_port: int | None = None

    @property
    def active_requests(self) -> int:
        """Predict calls in progress (the metrics export it)."""
        return self.pipeline.active_requests

    @property
    def batcher(self) -> MicroBatcher:
        return self.pipeline.batcher

    # -- health ---------------------------------------------------------------------------------
    async def _set_serving(self, serving: bool, reason: str = "") -> None:
        if serving == self._serving:
            return
        self._serving = serving
        self.metrics.sync()
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)
        if serving:
            log.info("health: SERVING")
        else:
            log.warning("health: NOT_SERVING (%s)", reason)

    async def _on_registry_state(self, serving: bool, reason: str) -> None:
        await self._set_serving(serving, reason)

    async def backend_failed(self, reason: str) -> None:
        self.registry.backend_error = reason
        await self._set_serving(False, f"backend unavailable: {reason}")

    async def backend_ok(self) -> None:
        if self._serving is False and self.registry.backend_error is not None:
            self.registry.backend_error = None
            await self._set_serving(self.registry.serving, "no model version ready")

    # -- lifecycle ------------------------------------------------------------------------------
    def _security(self) -> tuple[grpc.ServerCredentials | None, list]:
        """TLS credentials (None: plain TCP) and the interceptors (bearer-token check); see ``serve.auth``."""
        s = self.settings
        credentials = server_credentials(s.tls_cert, s.tls_key, s.tls_client_ca)
        token = load_token(s.auth_token, s.auth_token_file)
        interceptors = [TokenAuthInterceptor(token, on_failure=self.metrics.auth_failed)] if token else []
        if token and credentials is None:
            log.warning("bearer-token auth without TLS: the token crosses the network in clear text")
        return credentials, interceptors

    async def start(self) -> int:
        if self.worker is None:  # workers share the port the supervisor checked and reserved
            ensure_port_free(self.settings.listen)  # before anything loads: a busy port is refused at once
        await self._set_serving(False, "starting")
        credentials, interceptors = self._security()  # TLS files and token are read before anything starts
        # the port is bound first: a busy port refuses the start before any model loads or health says SERVING
        limit = self.settings.max_message_bytes
        self.server = grpc.aio.server(interceptors=interceptors, options=server_options(limit, self.worker is not None))
        self.port = self._bind(credentials)
        await self.backend.start()
        await self.registry.start()
        fatal = {k: v for k, v in self.registry.policy_errors.items() if not self.registry.snapshot.versions.get(k[0])}
        if fatal:
            raise PolicyError("; ".join(fatal.values()))
        self.server.add_generic_rpc_handlers((OODGuardService(self.pipeline, self.policy).handler(),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), self.server)
        await self.server.start()
        s = self.settings
        host = s.listen.rpartition(":")[0]
        if self.worker is not None:
            self._sync = asyncio.create_task(self._sync_metrics(), name="oodguard-metrics-sync")
        if s.metrics_port and (self.worker is None or self.worker.index == 0):
            metrics_host = s.metrics_host or host
            self.metrics_port = self.metrics.start_server(s.metrics_port, metrics_host, tls_cert=s.metrics_tls_cert,
                                                          tls_key=s.metrics_tls_key, auth_file=s.metrics_auth_file)
            if (s.tls_cert or s.auth_token or s.auth_token_file) and not (s.metrics_tls_cert or s.metrics_auth_file) \
                    and not _loopback(metrics_host):
                log.warning("the gRPC API requires TLS or a token, but /metrics on %s answers anyone who reaches it "
                            "(thresholds, flag rates, queue sizes): give --metrics-auth-file and --metrics-tls-cert, "
                            "or --metrics-host 127.0.0.1", metrics_host)
            log.info("metrics on %s://%s:%d/metrics%s", "https" if s.metrics_tls_cert else "http", metrics_host,
                     self.metrics_port, " (basic auth)" if s.metrics_auth_file else "")
        log.info("oodguard gateway%s listening on %s:%d (backend %s, repository %s, queue %s, decision %s)",
                 self._worker_name(), host, self.port, self.settings.backend, self.settings.repository,
                 describe_url(self.settings.effective_queue_url), self.policy.describe())
        for model, versions in sorted(self.registry.snapshot.versions.items()):
            for number in sorted(versions):
                log.info("model %s version %d: %s", model, number, describe(versions[number]))
        if not self.registry.snapshot.versions:
            log.warning("no model version ready yet; health NOT_SERVING until one is")
        return self.port

    def _bind(self, credentials) -> int:
        """Bind the gRPC server to ``settings.listen``; the bound port. A port another process holds (or an address
        this host lacks) is an OSError naming it, not grpc's RuntimeError."""
        listen = self.settings.listen
        try:
            if credentials is not None:
                port = self.server.add_secure_port(listen, credentials)
            else:
                port = self.server.add_insecure_port(listen)
        except RuntimeError:
            port = 0
        if not port:
            raise OSError(port_in_use_message(listen))
        return port

    def _worker_name(self) -> str:
        return "" if self.worker is None else f" worker {self.worker.index}/{self.worker.count}"

    async def _sync_metrics(self) -> None:
        """Multiprocess mode: this worker's state into the metrics files, once per SYNC_INTERVAL_S."""
        from .metrics import SYNC_INTERVAL_S

        while True:
            await asyncio.sleep(SYNC_INTERVAL_S)
            self.metrics.sync()

    async def stop(self, grace: float | None = None) -> None:
        """Drain: refuse new requests, let in-flight ones finish (up to ``grace`` s), then close everything."""
        grace = self.settings.drain_timeout_s if grace is None else grace
        self.pipeline.draining = True
        await self.health.enter_graceful_shutdown()
        if self.server is not None:
            await self.server.stop(grace)
        if self._sync is not None:
            self._sync.cancel()
        self.metrics.sync()  # the last counts of this worker reach the files
        self.metrics.stop_server()
        self.pipeline.close()
        await self.registry.close()
        try:
            await self.backend.close()
        finally:
            await asyncio.to_thread(self.queue.close)
        log.info("oodguard gateway stopped")


async def serve(settings: Settings, worker: WorkerSlot | None = None, ready=None) -> int:
    """Run until SIGTERM/SIGINT, then drain and return 0. ``worker``: one worker of ``--workers N``;
    ``ready()`` is called once the gateway listens."""
    gateway = Gateway(settings, worker=worker)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await gateway.start()
    except BaseException:
        await gateway.stop(0)
        raise
    if ready is not None:
        ready()
    await stop.wait()
    log.info("signal received: draining (up to %.0fs)", settings.drain_timeout_s)
    await gateway.stop()
    return 0


__all__ = ["Gateway", "build_backend", "build_queue", "server_options", "serve"]
