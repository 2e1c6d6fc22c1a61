"""The metric objects of one gateway and the hooks its request path calls (see the package docstring for
every name)."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, Sequence

import grpc
import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from oodguard.queues.base import QueueError

from ..backend import BackendUnavailable, DeadlineExceeded, ModelNotFound
from .collectors import LabelChildren, ScoreHistograms, StateCollector
from .definitions import (BAD_REQUEST_REASONS, INFLIGHT_HELP, LATENCY_BUCKETS, QUEUE_STATS_MIN_INTERVAL_S,
                          REACHABLE_HELP, REFUSED_REASONS, SCORE_PARTS, SERVING_HELP, SPOOL_HELP, UNKNOWN_MODEL)
from .http import start_metrics_server
from .multiprocess import WorkerFiles

if TYPE_CHECKING:  # pragma: no cover
    from ..decision import Decisions
    from ..registry import ServedVersion

log = logging.getLogger("oodguard.serve.metrics")


def _status_name(context: grpc.aio.ServicerContext | None, unset: str) -> str:
    """The name of the status the handler set (``context.abort`` / ``set_code``), else ``unset``."""
    try:
        code = context.code() if context is not None else None
    except Exception:  # noqa: BLE001
        code = None
    if isinstance(code, grpc.StatusCode):
        return code.name
    return unset


class GatewayMetrics:
    """Every metric object of one gateway, and the hooks the server calls."""

    def __init__(self, registry: CollectorRegistry | None = None,
                 queue_stats_interval_s: float = QUEUE_STATS_MIN_INTERVAL_S, multiprocess: bool = False):
        self.registry = registry if registry is not None else CollectorRegistry()
        self.multiprocess = multiprocess
        self.queue_stats_interval_s = queue_stats_interval_s
        r = self.registry
        self.requests = Counter("oodguard_requests", "Predict calls by model, version and gRPC status",
                                ["model", "version", "code"], registry=r)
        self.request_seconds = Histogram("oodguard_request_duration_seconds", "Predict latency, end to end",
                                         ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.backend_seconds = Histogram("oodguard_backend_duration_seconds", "Backend inference time of one (micro-)batch "
                                         "(failed calls included)", ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.backend_errors = Counter("oodguard_backend_errors", "Backend inference failures", ["model", "reason"],
                                      registry=r)
        self.items = Counter("oodguard_items", "Items decided", ["model", "version"], registry=r)
        self.flagged_items = Counter("oodguard_flagged_items", "Items flagged OOD", ["model", "version"], registry=r)
        self.unscorable_items = Counter("oodguard_unscorable_items", "Items flagged because a score is not finite",
                                        ["model", "version"], registry=r)
        self.out_of_range_items = Counter("oodguard_input_out_of_range_items", "Items flagged because the input lies "
                                          "outside the model's input range", ["model", "version"], registry=r)
        self.flagged = Counter("oodguard_flagged", "Flagged items per deciding score that crossed its threshold",
                               ["model", "version", "score"], registry=r)
        self.queue_seconds = Histogram("oodguard_queue_write_duration_seconds", "Time of one query-queue write",
                                       ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_failures = Counter("oodguard_queue_write_failures", "Query-queue writes that failed", ["model"],
                                      registry=r)
        self.queue_rejected = Counter("oodguard_queue_rejected_items", "Items refused by a full query queue",
                                      ["model"], registry=r)
        self.auth_failures = Counter("oodguard_auth_failures", "Calls refused with UNAUTHENTICATED", ["reason"],
                                     registry=r)
        refused = Counter("oodguard_refused_requests", "Calls refused with RESOURCE_EXHAUSTED by admission control",
                          ["reason"], registry=r)
        bad = Counter("oodguard_bad_requests", "Calls refused as malformed or over a size limit", ["reason"],
                      registry=r)
        # every reason exported from the start (at 0), so rate() and increase() see the first one
        self._refused = {reason: refused.labels(reason) for reason in REFUSED_REASONS}
        self._bad_requests = {reason: bad.labels(reason) for reason in BAD_REQUEST_REASONS}
        self._live: dict[str, Gauge] = {}
        if multiprocess:  # per-worker state, written by sync(); the files hold them, no registry needs them
            self._live = {name: Gauge(name, text, multiprocess_mode=mode, registry=None) for name, text, mode in (
                ("oodguard_serving", SERVING_HELP, "livemin"), ("oodguard_inflight_requests", INFLIGHT_HELP, "livesum"),
                ("oodguard_queue_spool_backlog", SPOOL_HELP, "livesum"),
                ("oodguard_queue_reachable", REACHABLE_HELP, "livemin"))}
        parts = Gauge(SCORE_PARTS, "score bucket counts of one worker", ["model", "version", "score", "le"],
                      multiprocess_mode="sum", registry=None) if multiprocess else None
        self.scores = ScoreHistograms(parts)
        r.register(self.scores)
        # children of the request-path metrics, by label values
        self._requests, self._request_seconds = LabelChildren(self.requests), LabelChildren(self.request_seconds)
        self._backend_seconds, self._items = LabelChildren(self.backend_seconds), LabelChildren(self.items)
        self._flagged_items, self._flagged = LabelChildren(self.flagged_items), LabelChildren(self.flagged)
        self._unscorable = LabelChildren(self.unscorable_items)
        self._out_of_range = LabelChildren(self.out_of_range_items)
        self._gateway: Any = None
        self._state: StateCollector | None = None
        self._server = None
        self._thread: threading.Thread | None = None

    def bind(self, gateway: Any) -> None:
        """Export the gateway's state (registry snapshot, health, queue) at scrape time; the queue statistics
        are read while the endpoint runs (:meth:`start_server` .. :meth:`stop_server`)."""
        self._gateway = gateway
        self._state = StateCollector(gateway, self.queue_stats_interval_s)
        self.registry.register(self._state)

    def sync(self) -> None:
        """Multiprocess mode: write this worker's state (serving, in-flight requests, the queue's local state)
        and its buffered score values to the files; the gateway calls it every :data:`SYNC_INTERVAL_S`."""
        if not self.multiprocess or self._gateway is None:
            return
        gw = self._gateway
        self.scores._fold()
        self._live["oodguard_serving"].set(1.0 if getattr(gw, "_serving", False) else 0.0)
        self._live["oodguard_inflight_requests"].set(float(getattr(gw, "active_requests", 0)))
        try:
            local = gw.queue.local_state()
        except Exception:  # noqa: BLE001 (a queue bug must not stop the sync)
            log.exception("metrics: cannot read the queue's local state")
            return
        self._live["oodguard_queue_spool_backlog"].set(float(local.spool_backlog))
        self._live["oodguard_queue_reachable"].set(1.0 if local.reachable else 0.0)

    def endpoint_registry(self) -> CollectorRegistry:
        """What ``/metrics`` serves: this gateway's registry, or in multiprocess mode every worker's files with
        this worker's state collector."""
        if not self.multiprocess:
            return self.registry
        registry = CollectorRegistry()
        registry.register(WorkerFiles(os.environ["PROMETHEUS_MULTIPROC_DIR"]))
        if self._state is not None:
            self._state.per_process = False
            registry.register(self._state)
        return registry

    # -- hooks ----------------------------------------------------------------------------------
    def _labels_of_request(self, request: Any) -> tuple[str, str]:
        """Bounded labels of a failed request: a served model/version, else ``unknown``."""
        try:
            served = self._gateway.registry.resolve(request.model, request.version or None)
            return served.model, str(served.version)
        except Exception:  # noqa: BLE001
            return UNKNOWN_MODEL, ""

    async def track_predict(self, request: Any, context: grpc.aio.ServicerContext, call: Awaitable) -> Any:
        """Await ``call`` (the Predict handler) and count it by model, version and status (the one it aborted
        with or set, e.g. RESOURCE_EXHAUSTED; CANCELLED when the client went away), with its latency."""
        started = time.perf_counter()
        try:
            response = await call
            code = _status_name(context, unset="OK")
            return response
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except BaseException:
            code = _status_name(context, unset="UNKNOWN")
            raise
        finally:
            if code == "OK":
                model, version = response.model, str(response.version)
            else:
                model, version = self._labels_of_request(request)
            self._requests(model, version, code).inc()
            self._request_seconds(model).observe(time.perf_counter() - started)

    async def time_backend(self, model: str, call: Awaitable) -> Any:
        """Await the backend's ``infer`` call, timing it and counting its failures by reason."""
        started = time.perf_counter()
        try:
            return await call
        except BackendUnavailable:
            self.backend_errors.labels(model, "unavailable").inc()
            raise
        except DeadlineExceeded:
            self.backend_errors.labels(model, "deadline").inc()
            raise
        except ModelNotFound:
            self.backend_errors.labels(model, "not_found").inc()
            raise
        finally:
            self._backend_seconds(model).observe(time.perf_counter() - started)

    async def time_queue_write(self, model: str, call: Awaitable[Sequence[str | None]]) -> Sequence[str | None]:
        """Await one queue write, timing it, counting a failure and the items a full queue refused."""
        started = time.perf_counter()
        try:
            ids = await call
        except QueueError:
            self.queue_failures.labels(model).inc()
            raise
        finally:
            self.queue_seconds.labels(model).observe(time.perf_counter() - started)
        rejected = sum(rid is None for rid in ids)
        if rejected:
            self.queue_rejected.labels(model).inc(rejected)
        return ids

    def observe_decisions(self, served: "ServedVersion", decisions: "Decisions") -> None:
        """Count a batch's items, flagged items (and those that failed closed: unscorable, input out of range)
        and the deciding scores that flagged them; record every score."""
        if not len(decisions):
            return
        model, version = served.model, str(served.version)
        # count_nonzero: a plain C count, not a ufunc reduction (several per batch, a few rows each)
        self._items(model, version).inc(len(decisions))
        self._unscorable(model, version).inc(int(np.count_nonzero(decisions.unscorable)))
        self._out_of_range(model, version).inc(int(np.count_nonzero(decisions.out_of_range)))
        flagged = int(np.count_nonzero(decisions.ood))
        if flagged:
            self._flagged_items(model, version).inc(flagged)
            for name in decisions.deciding:
                count = int(decisions.crossed[decisions.ood, decisions.names.index(name)].sum())
                if count:
                    self._flagged(model, version, name).inc(count)
        self.scores.observe(served, decisions.names, decisions.scores)

    def auth_failed(self, reason: str) -> None:
        self.auth_failures.labels(reason).inc()

    def request_refused(self, reason: str) -> None:
        """Admission control answered RESOURCE_EXHAUSTED; ``reason`` one of :data:`REFUSED_REASONS`."""
        self._refused.get(reason, self._refused["other"]).inc()

    def bad_request(self, reason: str) -> None:
        """A call refused as malformed or over a limit; ``reason`` one of :data:`BAD_REQUEST_REASONS`."""
        self._bad_requests.get(reason, self._bad_requests["other"]).inc()

    # -- HTTP endpoint --------------------------------------------------------------------------
    def start_server(self, port: int, host: str, tls_cert: str | Path | None = None,
                     tls_key: str | Path | None = None, auth_file: str | Path | None = None) -> int:
        """Serve ``/metrics`` on ``host:port`` (see :func:`start_metrics_server`) and start reading the queue
        statistics; returns the port."""
        self._server, self._thread = start_metrics_server(port, host, self.endpoint_registry(), tls_cert, tls_key,
                                                          auth_file)
        if self._state is not None:
            self._state.stats.start()
        return int(self._server.server_port)

    def stop_server(self) -> None:
        """Stop the endpoint and the queue statistics thread (before the queue closes)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        if self._state is not None:
            self._state.stats.close()
