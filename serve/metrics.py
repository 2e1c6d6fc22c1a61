"""Prometheus metrics of the gateway, served on their own port (``--metrics-port``; 0 = off): plain HTTP, or
HTTPS (``metrics_tls_cert`` / ``metrics_tls_key``), optionally behind HTTP basic auth (``metrics_auth_file``),
on ``metrics_host`` (default: the host of ``--listen``); see :func:`start_metrics_server`.

Every metric lives in the gateway's own :class:`prometheus_client.CollectorRegistry` (several gateways in
one process, as in the tests, do not collide).

With ``oodguard serve --workers N`` (:mod:`oodguard.serve.workers`) every worker runs in prometheus_client's
multiprocess mode (``GatewayMetrics(multiprocess=True)``): the request-path counters and histograms land in
memory-mapped files of one directory per serve start (``PROMETHEUS_MULTIPROC_DIR``), and worker 0 serves one
``/metrics`` that merges every worker's files (:class:`_WorkerFiles`, counters of dead workers included) with
its own view of the state (thresholds, model info, queue statistics: the same repository and store for all).
What differs per worker is written to the files too, once a second by :meth:`GatewayMetrics.sync`:
``oodguard_serving`` (the minimum over live workers: 1 only while every worker serves),
``oodguard_inflight_requests`` and ``oodguard_queue_spool_backlog`` (sums over live workers),
``oodguard_queue_reachable`` (minimum), and the score histograms (their bucket counts, as hidden gauges that
:class:`_WorkerFiles` turns back into ``oodguard_score``). Names, labels and types are those of one process.

Labels are bounded: ``model`` / ``version`` only take values of served versions (a request naming an unknown
model is counted as ``model="unknown"``), ``code`` is a gRPC status name, ``score`` a score the model exports;
request ids and client metadata never become labels.

Traffic (updated on the request path):

- ``oodguard_requests_total{model,version,code}``: Predict calls by gRPC status.
- ``oodguard_request_duration_seconds{model}``: Predict latency, end to end (histogram).
- ``oodguard_backend_duration_seconds{model}``: backend inference time of one micro-batch (concurrent requests
  share one call), failed calls included (histogram).
- ``oodguard_backend_errors_total{model,reason}``: failed backend calls (micro-batches) by reason (``unavailable``,
  ``deadline``, ``not_found``).
- ``oodguard_items_total{model,version}``: items decided (a request holds one or more items).
- ``oodguard_flagged_items_total{model,version}``: items flagged OOD (the flagged rate is this over ``items``),
  for any reason: the policy's thresholds, or failing closed (the two counters below).
- ``oodguard_unscorable_items_total{model,version}``: items flagged because a score is not finite.
- ``oodguard_input_out_of_range_items_total{model,version}``: items flagged because the input lies outside the
  model's input range.
- ``oodguard_flagged_total{model,version,score}``: flagged items per deciding score that crossed its
  threshold (an item crossed by two deciding scores counts once for each).
- ``oodguard_score{model,version,score}``: every score's value (histogram). Its buckets come from that
  version's calibration: quantiles of the in-distribution calibration scores, the threshold itself and
  points beyond the largest calibration score, so in-distribution traffic fills each bucket with a known
  share and a shift shows as a change of the bucket shares. (Series with a negative bound have no
  ``_count`` / ``_sum``, as OpenMetrics requires: their ``le="+Inf"`` bucket is the count.)
- ``oodguard_queue_write_duration_seconds{model}``: time of one queue write (histogram).
- ``oodguard_queue_write_failures_total{model}``: queue writes that failed (the request got UNAVAILABLE).
- ``oodguard_queue_rejected_items_total{model}``: items refused by a full queue (policy ``reject``).
- ``oodguard_auth_failures_total{reason}``: calls refused with UNAUTHENTICATED (``missing``, ``invalid``).
- ``oodguard_refused_requests_total{reason}``: calls refused with RESOURCE_EXHAUSTED by admission control
  (:data:`REFUSED_REASONS`).
- ``oodguard_bad_requests_total{reason}``: calls refused as malformed or over a size limit
  (:data:`BAD_REQUEST_REASONS`).

State (read when scraped):

- ``oodguard_threshold{model,version,score,deciding}``: every score's calibrated threshold.
- ``oodguard_calibrated_flag_rate{model,version}``: p0, the share of in-distribution traffic the decision
  policy flags by design (conformal: ``(n + 1 - accepted) / (n + 1)`` per score, about 5% at 95% TPR;
  several deciding scores: their sum for mode ``any`` (an upper bound), the smallest for ``all``).
- ``oodguard_calibrated_flag_rate_upper{model,version}``: the same from the upper end of each threshold's
  95% Clopper-Pearson TPR interval: the rate the alert compares with (it allows for the calibration set's
  own sampling error).
- ``oodguard_model_info{model,version,latest,backend}`` = 1 per served version.
- ``oodguard_serving``: 1 when gRPC health is SERVING.
- ``oodguard_queue_spool_backlog`` and ``oodguard_queue_reachable`` (1/0): from the queue's own memory
  (:meth:`QueryQueue.local_state`), on every scrape, also while the queue's store is down.
- ``oodguard_queue_size`` (unharvested), ``oodguard_queue_pending``, ``oodguard_queue_max_size``,
  ``oodguard_queue_bytes``, ``oodguard_queue_max_bytes``, ``oodguard_queue_accepted_total``,
  ``oodguard_queue_rejected_total``, ``oodguard_queue_evicted_total`` (the queue's own counters, which survive
  restarts): the store's statistics, read by a thread of their own while the endpoint runs (a scrape never
  waits on the store); ``oodguard_queue_stats_up`` is 0, and these are left out, when the last read failed
  or the current one is stuck (running for :data:`QUEUE_STATS_STUCK_INTERVALS` intervals: a hung store).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import os
import socket
import ssl
import threading
import time
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Iterable, Sequence
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

import grpc
import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from .backend import BackendUnavailable, DeadlineExceeded, ModelNotFound
from oodguard.queues.base import QueryQueue, QueueError, QueueStats

if TYPE_CHECKING:  # pragma: no cover
    from oodguard.calibration import ScoreThreshold

    from .decision import DecisionPolicy, Decisions
    from .registry import ServedVersion

log = logging.getLogger("oodguard.serve.metrics")

#: end-to-end and backend latency buckets, seconds
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, float("inf"))
#: calibration-score quantiles that become bucket boundaries of ``oodguard_score`` (the threshold is added)
SCORE_QUANTILES = (0.01, 0.05, 0.10, 0.25, 0.50, 0.75, 0.90, 0.99)
#: boundaries beyond the largest calibration score, in units of its 5%..95% spread
SCORE_TAIL_STEPS = (0.25, 0.5, 1.0, 2.0, 4.0)
UNKNOWN_MODEL = "unknown"
#: queue statistics are read at most this often, seconds
QUEUE_STATS_MIN_INTERVAL_S = 1.0
#: ... and, while reads succeed, at most this share of the time (SQLite counts 100k records in ~0.2 s, holding
#: the queue's lock) but at least once per QUEUE_STATS_MAX_PERIOD_S
QUEUE_STATS_MAX_DUTY = 0.05
QUEUE_STATS_MAX_PERIOD_S = 10.0
#: a read running longer than this many QUEUE_STATS_MIN_INTERVAL_S is stuck: ``oodguard_queue_stats_up`` 0
QUEUE_STATS_STUCK_INTERVALS = 3
#: ``request_refused`` reasons (admission control answered RESOURCE_EXHAUSTED); anything else counts as "other"
REFUSED_REASONS = ("inflight_requests", "inflight_items", "inflight_bytes", "decode_queue", "other")
#: ``bad_request`` reasons; anything else counts as "other"
BAD_REQUEST_REASONS = ("undecodable", "too_many_fields", "request_id_too_long", "metadata_too_large", "image_too_large",
                       "image_format", "image_structure", "reply_too_large", "other")
#: the metrics endpoint: seconds a connection gets for its TLS handshake and for each read or write
HTTP_TIMEOUT_S = 10.0
SCORE_HELP = ("OOD score values; buckets from the version's calibration (calibration quantiles, the threshold, steps "
              "above the largest calibration score)")
SERVING_HELP = "1 when the gateway's gRPC health is SERVING"
INFLIGHT_HELP = "Predict calls admitted and not answered yet (admission control refuses above --max-inflight-requests)"
SPOOL_HELP = "Records waiting in the local spool for the queue store"
REACHABLE_HELP = "1 unless the query queue's store is known to be unreachable (its last call failed)"
#: multiprocess mode: the hidden gauge holding score bucket counts (label ``le``; ``le="sum"``: the sum)
SCORE_PARTS = "oodguard_score_parts"
#: multiprocess mode: how often each worker writes its per-worker state and folded scores to the files, seconds
SYNC_INTERVAL_S = 1.0


def score_buckets(threshold: "ScoreThreshold") -> tuple[float, ...]:
    """Histogram boundaries of one score, derived from its calibration (ascending, ending with +Inf):
    quantiles of the calibration scores, the threshold, the largest calibration score and steps above it."""
    calib = np.asarray(threshold.sorted_scores, dtype=np.float64)
    points = [float(threshold.threshold)]
    if calib.size:
        points += [float(v) for v in np.quantile(calib, SCORE_QUANTILES)]
        top = float(calib[-1])
        lo, hi = (float(v) for v in np.quantile(calib, (0.05, 0.95)))
        spread = hi - lo
        if not spread > 0:
            spread = max(abs(top), 1.0) * 1e-3
        points.append(top)
        points += [top + step * spread for step in SCORE_TAIL_STEPS]
    bounds = sorted({p for p in points if np.isfinite(p)})  # exact: the threshold bucket is "score <= threshold"
    return tuple(bounds) + (float("inf"),)


def expected_flag_rates(served: "ServedVersion", policy: "DecisionPolicy") -> tuple[float, float]:
    """(p0, upper bound of p0): the share of in-distribution items the policy flags, from the calibration."""
    point, upper = [], []
    for name in policy.scores:
        t = served.calibration.thresholds[name]
        point.append((t.n + 1 - t.accepted) / (t.n + 1))
        upper.append(1.0 - float(t.achieved_tpr_ci95[0]))
    if policy.mode == "any":
        return min(1.0, sum(point)), min(1.0, sum(upper))
    return min(point), min(upper)


class _ScoreHistograms(Collector):
    """``oodguard_score``: one histogram per (model, version, score), each with its own calibration buckets
    (prometheus_client's Histogram has one bucket set per metric, hence this collector).

    The request path only appends each batch's ``[B, S]`` score matrix to a buffer (no NumPy work per
    request); the buffer is folded into the bucket counts at scrape time, or once it holds
    ``FOLD_ROWS`` rows, so memory stays bounded however rarely Prometheus scrapes."""

    FOLD_ROWS = 4096

    def __init__(self, parts: Gauge | None = None) -> None:
        #: multiprocess mode: every fold also adds its bucket counts to this gauge (labels model, version,
        #: score, le), which the metrics worker reads from the files
        self._parts = None if parts is None else _Children(parts)
        self._lock = threading.Lock()  # guards the buffer and the series' counts
        self._fold_lock = threading.Lock()  # one fold at a time (request path and scrape thread)
        #: (model, version, score) → (upper bounds, cumulative-free bucket counts, sum)
        self._series: dict[tuple[str, str, str], list[Any]] = {}
        self._buffer: list[tuple["ServedVersion", tuple[str, ...], np.ndarray]] = []
        self._buffered_rows = 0

    def observe(self, served: "ServedVersion", names: Sequence[str], scores: np.ndarray) -> None:
        """Record ``scores`` (``[B, len(names)]``, one column per score) of one batch."""
        with self._lock:
            self._buffer.append((served, tuple(names), scores))
            self._buffered_rows += len(scores)
            full = self._buffered_rows >= self.FOLD_ROWS
        if full:
            self._fold()

    def _fold(self) -> None:
        with self._fold_lock:
            with self._lock:
                buffer, self._buffer, self._buffered_rows = self._buffer, [], 0
            self._count(buffer)

    def _count(self, buffer: list) -> None:
        groups: dict[tuple[str, int, tuple[str, ...]], list] = {}
        for served, names, scores in buffer:
            groups.setdefault((served.model, served.version, names), [served, []])[1].append(scores)
        for (model, version, names), (served, parts) in groups.items():
            scores = np.concatenate(parts)
            for j, name in enumerate(names):
                if name not in served.calibration.thresholds:
                    continue
                key = (model, str(version), name)
                series = self._series.get(key)
                if series is None:
                    bounds = np.asarray(score_buckets(served.calibration.thresholds[name]), dtype=np.float64)
                    series = self._series.setdefault(key, [bounds, np.zeros(len(bounds), np.int64), 0.0])
                values = scores[:, j]
                values = values[np.isfinite(values)]
                # Prometheus buckets are "le": a value equal to a bound falls in that bound's bucket
                index = np.searchsorted(series[0], values, side="left")
                counts = np.bincount(index, minlength=len(series[0]))[: len(series[0])]
                with self._lock:
                    series[1] += counts
                    series[2] += float(values.sum())
                if self._parts is not None:
                    for bound, count in zip(series[0], counts):
                        if count:
                            self._parts(*key, floatToGoString(bound)).inc(int(count))
                    self._parts(*key, "sum").inc(float(values.sum()))

    def collect(self) -> Iterable[HistogramMetricFamily]:
        family = HistogramMetricFamily("oodguard_score", SCORE_HELP, labels=["model", "version", "score"])
        self._fold()
        with self._lock:
            items = [(key, s[0], s[1].copy(), s[2]) for key, s in sorted(self._series.items())]
        for key, bounds, counts, total in items:
            cumulative = np.cumsum(counts)
            buckets = [(floatToGoString(b), float(c)) for b, c in zip(bounds, cumulative)]
            family.add_metric(list(key), buckets, total)
        yield family


class _QueueStatsPoller:
    """Reads ``queue.stats()`` in a thread of its own, at most once per ``interval_s`` (and at most
    :data:`QUEUE_STATS_MAX_DUTY` of the time); :meth:`current` hands a scrape the last result without waiting."""

    def __init__(self, queue: QueryQueue, interval_s: float):
        self.queue, self.interval_s = queue, interval_s
        self._last: QueueStats | None = None  # None: the last read failed (or none ended yet)
        self._reading_since: float | None = None  # monotonic start of the read in progress
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="oodguard-queue-stats", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        failing, last_took = False, float("inf")
        while True:
            started = self._reading_since = time.monotonic()
            try:
                self._last = self.queue.stats()
            except Exception as exc:  # noqa: BLE001 (the store is down, or a queue bug: keep polling)
                if not failing:
                    log.warning("metrics: cannot read queue statistics: %s", exc)
                failing = True
                self._last = None
                period = self.interval_s
            else:
                if failing:
                    log.info("metrics: queue statistics readable again")
                failing = False
                # a store slow to count is read less often; one slow read (a hang that ended) is not enough
                took = time.monotonic() - started
                period = min(max(self.interval_s, min(took, last_took) / QUEUE_STATS_MAX_DUTY),
                             QUEUE_STATS_MAX_PERIOD_S)
                last_took = took
            self._reading_since = None
            if self._stop.wait(max(0.0, started + period - time.monotonic())):
                return

    def current(self) -> QueueStats | None:
        """The last statistics; None when the last read failed or the one in progress is stuck."""
        since = self._reading_since
        if since is not None and time.monotonic() - since > QUEUE_STATS_STUCK_INTERVALS * self.interval_s:
            return None
        return self._last

    def close(self, timeout_s: float = 2.0) -> None:
        """Stop the thread; a read stuck in the store is not waited for beyond ``timeout_s`` (the thread is a
        daemon and ends when the read returns or fails, e.g. once the queue is closed)."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.warning("metrics: a queue statistics read is still running at stop")
        self._thread = None


class _StateCollector(Collector):
    """Read at scrape time: thresholds, calibrated flag rates, model info, serving state, the queue's local
    state, and the last queue statistics of :class:`_QueueStatsPoller` (nothing here waits on the queue)."""

    def __init__(self, gateway: Any, stats_interval_s: float) -> None:
        self.gateway = gateway
        self.stats = _QueueStatsPoller(gateway.queue, stats_interval_s)
        #: False in multiprocess mode: serving, in-flight requests and the queue's local state come from every
        #: worker's files instead of this process
        self.per_process = True

    def collect(self):
        gw = self.gateway
        threshold = GaugeMetricFamily("oodguard_threshold", "Calibrated threshold of every score (score > threshold "
                                      "crosses)", labels=["model", "version", "score", "deciding"])
        rate = GaugeMetricFamily("oodguard_calibrated_flag_rate", "p0: share of in-distribution items the decision "
                                 "policy flags by design, from the calibration", labels=["model", "version"])
        upper = GaugeMetricFamily("oodguard_calibrated_flag_rate_upper", "Upper 95% bound of p0 (Clopper-Pearson "
                                  "interval of the calibrated TPR)", labels=["model", "version"])
        info = GaugeMetricFamily("oodguard_model_info", "1 per served model version",
                                 labels=["model", "version", "latest", "backend"])
        versions = gw.registry.snapshot.versions
        for model in sorted(versions):
            latest = max(versions[model]) if versions[model] else None
            for number in sorted(versions[model]):
                served = versions[model][number]
                policy = served.rule.policy  # the gateway's, or its fallback for this version
                v = str(number)
                info.add_metric([model, v, str(number == latest).lower(), gw.settings.backend], 1.0)
                for name in served.scores:
                    threshold.add_metric([model, v, name, str(name in policy.scores).lower()],
                                         float(served.calibration.thresholds[name].threshold))
                p0, p0_upper = expected_flag_rates(served, policy)
                rate.add_metric([model, v], p0)
                upper.add_metric([model, v], p0_upper)
        yield from (threshold, rate, upper, info)
        if self.per_process:
            yield GaugeMetricFamily("oodguard_serving", SERVING_HELP, value=1.0 if getattr(gw, "_serving", False) else 0.0)
            yield GaugeMetricFamily("oodguard_inflight_requests", INFLIGHT_HELP,
                                    value=float(getattr(gw, "active_requests", 0)))
        yield from self._queue_state()

    def _queue_state(self):
        if not self.per_process:
            yield from self._queue_stats()
            return
        try:
            local = self.gateway.queue.local_state()
        except Exception:  # noqa: BLE001 (a queue bug must not fail the whole scrape)
            log.exception("metrics: cannot read the queue's local state")
        else:
            yield GaugeMetricFamily("oodguard_queue_spool_backlog", SPOOL_HELP, value=float(local.spool_backlog))
            yield GaugeMetricFamily("oodguard_queue_reachable", REACHABLE_HELP, value=1.0 if local.reachable else 0.0)
        yield from self._queue_stats()

    def _queue_stats(self):
        stats = self.stats.current()
        yield GaugeMetricFamily("oodguard_queue_stats_up", "1 when the query queue's statistics can be read (the "
                                "last read worked and none is stuck)", value=0.0 if stats is None else 1.0)
        if stats is None:
            return
        for name, text, value in (
                ("oodguard_queue_size", "Unharvested (pending + claimed) records in the query queue", stats.size),
                ("oodguard_queue_pending", "Pending records in the query queue", stats.pending),
                ("oodguard_queue_max_size", "Bound of the query queue, records", stats.max_size),
                ("oodguard_queue_bytes", "Stored bytes of the unharvested records in the query queue", stats.bytes),
                ("oodguard_queue_max_bytes", "Bound of the query queue, bytes", stats.max_bytes)):
            yield GaugeMetricFamily(name, text, value=float(value))
        for name, text, value in (
                ("oodguard_queue_accepted", "Records ever stored by the query queue", stats.accepted),
                ("oodguard_queue_rejected", "Records refused by the full query queue (policy reject)", stats.rejected),
                ("oodguard_queue_evicted", "Pending records evicted by the full query queue (policy evict-oldest)",
                 stats.evicted)):
            yield CounterMetricFamily(name, text, value=float(value))


class _WorkerFiles(Collector):
    """Multiprocess mode: what every worker wrote to ``path`` (prometheus_client's :class:`MultiProcessCollector`:
    counters and histograms summed over all workers, dead ones included; gauges by their ``multiprocess_mode``),
    with the hidden score bucket gauges turned back into the ``oodguard_score`` histograms."""

    def __init__(self, path: str) -> None:
        from prometheus_client.multiprocess import MultiProcessCollector

        self._files = MultiProcessCollector(None, path)

    def collect(self):
        parts: dict[tuple[str, str, str], dict[str, float]] = {}
        for family in self._files.collect():
            if family.name != SCORE_PARTS:
                yield family
                continue
            for sample in family.samples:
                labels = sample.labels
                parts.setdefault((labels["model"], labels["version"], labels["score"]), {})[labels["le"]] = sample.value
        scores = HistogramMetricFamily("oodguard_score", SCORE_HELP, labels=["model", "version", "score"])
        for key in sorted(parts):
            counts = parts[key]
            total = counts.pop("sum", 0.0)
            bounds = sorted(counts, key=float)
            cumulative = np.cumsum([counts[b] for b in bounds])
            scores.add_metric(list(key), [(b, float(c)) for b, c in zip(bounds, cumulative)], total)
        yield scores


class _Children:
    """``metric.labels(*values)`` with the children kept: ``labels()`` validates its arguments and takes a
    lock on every call, a cost paid per request on the hot path. Label values are bounded (served versions,
    status names, score names), so the cache is too; no child is ever removed from these metrics."""

    __slots__ = ("_metric", "_cache")

    def __init__(self, metric: Any) -> None:
        self._metric = metric
        self._cache: dict[tuple[str, ...], Any] = {}

    def __call__(self, *values: str) -> Any:
        child = self._cache.get(values)
        if child is None:
            child = self._cache[values] = self._metric.labels(*values)
        return child


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
        self.scores = _ScoreHistograms(parts)
        r.register(self.scores)
        # children of the request-path metrics, by label values
        self._requests, self._request_seconds = _Children(self.requests), _Children(self.request_seconds)
        self._backend_seconds, self._items = _Children(self.backend_seconds), _Children(self.items)
        self._flagged_items, self._flagged = _Children(self.flagged_items), _Children(self.flagged)
        self._unscorable, self._out_of_range = _Children(self.unscorable_items), _Children(self.out_of_range_items)
        self._gateway: Any = None
        self._state: _StateCollector | None = None
        self._server = None
        self._thread: threading.Thread | None = None

    def bind(self, gateway: Any) -> None:
        """Export the gateway's state (registry snapshot, health, queue) at scrape time; the queue statistics
        are read while the endpoint runs (:meth:`start_server` .. :meth:`stop_server`)."""
        self._gateway = gateway
        self._state = _StateCollector(gateway, self.queue_stats_interval_s)
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
        registry.register(_WorkerFiles(os.environ["PROMETHEUS_MULTIPROC_DIR"]))
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


class _QuietHandler(WSGIRequestHandler):
    timeout = HTTP_TIMEOUT_S  # a client that stalls mid-request frees its thread

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        """No access log."""


class _MetricsServer(ThreadingMixIn, WSGIServer):
    """A thread-per-connection WSGI server, as prometheus_client's, except that with TLS the handshake runs in
    the connection's own thread (prometheus_client's runs it in the accept loop, where one client that
    connects and stays silent blocks every scrape)."""

    daemon_threads = True

    def __init__(self, address: tuple, family: socket.AddressFamily, tls: ssl.SSLContext | None):
        self.address_family, self.tls = family, tls
        super().__init__(address, _QuietHandler)

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
                         auth_file: str | Path | None = None) -> tuple[_MetricsServer, threading.Thread]:
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
    server = _MetricsServer(address, family, tls)
    server.set_app(app)
    thread = threading.Thread(target=server.serve_forever, name="oodguard-metrics-http", daemon=True)
    thread.start()
    return server, thread


__all__ = ["GatewayMetrics", "start_metrics_server", "basic_auth", "load_basic_auth", "score_buckets",
           "expected_flag_rates", "LATENCY_BUCKETS", "REFUSED_REASONS", "BAD_REQUEST_REASONS"]
