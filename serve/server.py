"""The gateway process: the gRPC server (``oodguard.v1.OODGuard`` + standard health + reflection) over one
backend, the registry of served versions, the micro-batcher, the query queue and the metrics; start and drain.

The service's handlers live in :mod:`oodguard.serve.service`, input parsing and limits in
:mod:`oodguard.serve.inputs`. The gateway runs each micro-batch (one backend call for concurrent requests
of one version, :mod:`oodguard.serve.batching`), decides it with the version's thresholds (failing closed
on unscorable items and inputs outside the model's range, :mod:`oodguard.serve.decision`), counts it once,
and writes the flagged (and sampled) items of the requests of a micro-batch to the query queue in one write
(:mod:`oodguard.queues.writer`) before answering them. Never imports torch.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import signal

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from .auth import TokenAuthInterceptor, load_token, server_credentials
from .backend import Backend, BackendUnavailable, DeadlineExceeded
from .batching import MicroBatcher
from .decision import Decisions, DecisionPolicy, PolicyError
from .inputs import InputLimits
from .listen import ensure_port_free, port_in_use_message
from .memory import MemoryTrimmer
from .metrics import GatewayMetrics
from oodguard.queues.base import NewRecord, QueryQueue, QueueError
from oodguard.queues.factory import describe_url
from oodguard.queues.writer import QueueWriter
from .registry import Registry, ServedVersion, describe
from .service import SERVICE_NAME, ImageDecoder, OODGuardService
from .settings import Settings
from .v1 import oodguard_pb2 as pb
from .workers import WorkerSlot

log = logging.getLogger("oodguard.serve")


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


# -- the gateway ------------------------------------------------------------------------------------
class BatchOutcome:
    """What one micro-batch produced: the version that answered, every model output, the decisions, and
    (computed on first use, once per batch) the class probabilities and classes ranked by them."""

    def __init__(self, served: ServedVersion, outputs: dict[str, np.ndarray], decisions: Decisions):
        self.served, self.outputs, self.decisions = served, outputs, decisions
        self._probabilities: np.ndarray | None = None
        self._ranking: np.ndarray | None = None

    @property
    def probabilities(self) -> np.ndarray:
        if self._probabilities is None:
            self._probabilities = _softmax(np.asarray(self.outputs["logits"]))
        return self._probabilities

    @property
    def ranking(self) -> np.ndarray:
        """Class indices by falling probability per row (ties: the lower index first)."""
        if self._ranking is None:
            self._ranking = np.argsort(-self.probabilities, axis=1, kind="stable")
        return self._ranking


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


#: consecutive backend calls timing out after the whole --backend-timeout-s that turn health NOT_SERVING (the
#: registry's next successful poll, or the next answered call, turns it back)
BACKEND_TIMEOUTS_NOT_SERVING = 3


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
        self.input_limits = InputLimits.from_settings(settings)
        self.decoder = ImageDecoder(settings.decode_workers, settings.decode_queue_max_images)
        self.tensor_converter = ImageDecoder(settings.decode_workers, settings.decode_queue_max_images, "oodguard-uint8")
        self.trimmer = MemoryTrimmer()  # returns freed request memory to the OS
        self.health = health.aio.HealthServicer()
        self.draining = False
        self.port: int | None = None
        self.server: grpc.aio.Server | None = None
        self._rng = random.Random(settings.sample_seed)
        self._serving: bool | None = None
        self.metrics = GatewayMetrics(multiprocess=worker is not None)
        self.metrics.bind(self)
        self._sync: asyncio.Task | None = None
        #: Predict calls in progress; the embedded backend runs small single rows inline only when alone
        self.active_requests = 0
        self.backend.inline_allowed = lambda: self.active_requests <= 1
        self.batcher: MicroBatcher[BatchOutcome] = MicroBatcher(self.run_batch,
                                                                max_inflight=self.backend.max_inflight_batches,
                                                                max_wait_s=settings.max_wait_ms / 1000.0)
        self.queue_writer = QueueWriter(self.queue, self.batcher.after_batch)  # one put per micro-batch
        self.metrics_port: int | None = None
        self._backend_timeouts = 0  # consecutive backend calls that used their whole backend_timeout_s

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

    # -- queue ----------------------------------------------------------------------------------
    def choose_for_queue(self, decisions: Decisions) -> tuple[list[int], list[bool]]:
        """Which of a request's items go to the queue (every flagged one, and the sampled share of unflagged
        ones), and the sampled flags of all items."""
        fraction = self.settings.unflagged_sample_fraction
        ood = decisions.ood.tolist()
        if not fraction > 0:  # nothing sampled (the default): no random draw, as below
            return [i for i, flagged in enumerate(ood) if flagged], [False] * len(ood)
        sampled = [not flagged and self._rng.random() < fraction for flagged in ood]
        return [i for i, flagged in enumerate(ood) if flagged or sampled[i]], sampled

    async def enqueue(self, x: np.ndarray, outcome: "BatchOutcome", rows: slice, decisions: Decisions,
                      request: pb.PredictRequest, chosen: list[int]) -> list[str | None]:
        """Queue the ``chosen`` items of a request before answering. ``rows`` are the request's rows of
        ``outcome`` (its micro-batch), ``decisions`` theirs. Returns per chosen item its record id, or None
        where a full queue refused it (the queue logs and counts those). Every record of the request shares
        one metadata dict: the queue stores it once."""
        served = outcome.served
        logits, features = outcome.outputs["logits"][rows], outcome.outputs["features"][rows]
        metadata = dict(request.metadata)
        records = []
        for i in chosen:
            verdict = decisions.verdict(i)
            # "item": the record's position in its request (ties it to per-item client metadata)
            records.append(NewRecord(model=served.model, version=served.version, input=x[i], logits=logits[i],
                                     features=features[i], scores=verdict.scores,
                                     decision={**verdict.to_dict(), "item": i},
                                     flagged=verdict.ood, request_id=request.request_id, metadata=metadata))
        try:
            return await self.metrics.time_queue_write(served.model, self.queue_writer.put(records))
        except QueueError as exc:
            log.error("query queue write failed: %s", exc)
            raise

    # -- micro-batches --------------------------------------------------------------------------
    async def run_batch(self, served: ServedVersion, x: np.ndarray, timeout_s: float | None) -> "BatchOutcome":
        """One backend call for a micro-batch of requests, decided and counted once for all of them."""
        try:
            result = await self.metrics.time_backend(served.model, self.backend.infer(served.model, served.version, x,
                                                                                        timeout_s))
        except BackendUnavailable as exc:
            await self.backend_failed(str(exc))
            raise
        except DeadlineExceeded:
            # a call given the whole --backend-timeout-s that still got no answer: the backend hangs (a paused
            # Triton keeps its port open); a client's short deadline says nothing about the backend
            if timeout_s is not None and timeout_s >= 0.9 * self.settings.backend_timeout_s:
                self._backend_timeouts += 1
                if self._backend_timeouts >= BACKEND_TIMEOUTS_NOT_SERVING:
                    await self.backend_failed(f"{self._backend_timeouts} calls in a row got no answer within "
                                              f"--backend-timeout-s ({self.settings.backend_timeout_s:g} s)")
            raise
        self._backend_timeouts = 0
        await self.backend_ok()
        if result.version != served.version:
            served = self.registry.resolve(served.model, result.version)
        decisions = served.rule(result.outputs, served.input_range.outside(x))
        self.metrics.observe_decisions(served, decisions)
        return BatchOutcome(served, result.outputs, decisions)

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
        self.server.add_generic_rpc_handlers((OODGuardService(self).handler(),))
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
        self.draining = True
        await self.health.enter_graceful_shutdown()
        if self.server is not None:
            await self.server.stop(grace)
        if self._sync is not None:
            self._sync.cancel()
        self.metrics.sync()  # the last counts of this worker reach the files
        self.metrics.stop_server()
        self.decoder.close()
        self.tensor_converter.close()
        self.trimmer.close()
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


__all__ = ["Gateway", "BatchOutcome", "build_backend", "build_queue", "server_options", "serve"]
