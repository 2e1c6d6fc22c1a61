"""Prometheus metrics of the gateway, served over plain HTTP on their own port (``--metrics-port``; 0 = off).

Every metric lives in the gateway's own :class:`prometheus_client.CollectorRegistry` (several gateways in
one process, as in the tests, do not collide). Labels are bounded: ``model`` / ``version`` only take
values of served versions (a request naming an unknown model is counted as ``model="unknown"``), ``code``
is a gRPC status name, ``score`` a score the model exports; request ids and client metadata never become
labels.

Traffic (updated on the request path):

- ``oodguard_requests_total{model,version,code}``: Predict calls by gRPC status.
- ``oodguard_request_duration_seconds{model}``: Predict latency, end to end (histogram).
- ``oodguard_backend_duration_seconds{model}``: backend inference time of one micro-batch (concurrent requests
  share one call), failed calls included (histogram).
- ``oodguard_backend_errors_total{model,reason}``: failed backend calls (micro-batches) by reason (``unavailable``,
  ``deadline``, ``not_found``).
- ``oodguard_items_total{model,version}``: items decided (a request holds one or more items).
- ``oodguard_flagged_items_total{model,version}``: items flagged OOD (the flagged rate is this over ``items``).
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
- ``oodguard_queue_size`` (unharvested), ``oodguard_queue_pending``, ``oodguard_queue_max_size``,
  ``oodguard_queue_spool_backlog``, ``oodguard_queue_accepted_total``, ``oodguard_queue_rejected_total``,
  ``oodguard_queue_evicted_total`` (the queue's own counters, which survive restarts), and
  ``oodguard_queue_stats_up`` (0 when the queue could not be read at the last scrape).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Awaitable, Iterable, Sequence

import grpc
import numpy as np
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from .backend import BackendUnavailable, DeadlineExceeded, ModelNotFound
from .queue import QueueError

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
#: queue statistics are read at most this often (a scrape storm does not hammer the queue)
QUEUE_STATS_MIN_INTERVAL_S = 1.0


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

    def __init__(self) -> None:
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

    def collect(self) -> Iterable[HistogramMetricFamily]:
        family = HistogramMetricFamily("oodguard_score", "OOD score values; buckets from the version's calibration "
                                       "(calibration quantiles, the threshold, steps above the largest calibration score)",
                                       labels=["model", "version", "score"])
        self._fold()
        with self._lock:
            items = [(key, s[0], s[1].copy(), s[2]) for key, s in sorted(self._series.items())]
        for key, bounds, counts, total in items:
            cumulative = np.cumsum(counts)
            buckets = [(floatToGoString(b), float(c)) for b, c in zip(bounds, cumulative)]
            family.add_metric(list(key), buckets, total)
        yield family


class _StateCollector(Collector):
    """Read at scrape time: thresholds, calibrated flag rates, model info, serving state, queue statistics."""

    def __init__(self, gateway: Any) -> None:
        self.gateway = gateway
        self._stats_lock = threading.Lock()
        self._stats: Any = None
        self._stats_at = -1e9
        self._stats_ok = False

    def _queue_stats(self):
        with self._stats_lock:
            now = time.monotonic()
            if now - self._stats_at >= QUEUE_STATS_MIN_INTERVAL_S:
                self._stats_at = now
                try:
                    self._stats = self.gateway.queue.stats()
                    self._stats_ok = True
                except (QueueError, OSError) as exc:
                    log.warning("metrics: cannot read queue statistics: %s", exc)
                    self._stats_ok = False
                except Exception:  # noqa: BLE001 (a scrape must not fail on a queue bug)
                    log.exception("metrics: cannot read queue statistics")
                    self._stats_ok = False
            return self._stats if self._stats_ok else None, self._stats_ok

    def collect(self):
        gw = self.gateway
        policy = gw.policy
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
                v = str(number)
                info.add_metric([model, v, str(number == latest).lower(), gw.settings.backend], 1.0)
                for name in served.scores:
                    threshold.add_metric([model, v, name, str(name in policy.scores).lower()],
                                         float(served.calibration.thresholds[name].threshold))
                p0, p0_upper = expected_flag_rates(served, policy)
                rate.add_metric([model, v], p0)
                upper.add_metric([model, v], p0_upper)
        yield from (threshold, rate, upper, info)
        yield GaugeMetricFamily("oodguard_serving", "1 when the gateway's gRPC health is SERVING",
                                value=1.0 if getattr(gw, "_serving", False) else 0.0)

        stats, ok = self._queue_stats()
        yield GaugeMetricFamily("oodguard_queue_stats_up", "1 when the query queue's statistics could be read",
                                value=1.0 if ok else 0.0)
        if stats is None:
            return
        for name, text, value in (
                ("oodguard_queue_size", "Unharvested (pending + claimed) records in the query queue", stats.size),
                ("oodguard_queue_pending", "Pending records in the query queue", stats.pending),
                ("oodguard_queue_max_size", "Bound of the query queue", stats.max_size),
                ("oodguard_queue_spool_backlog", "Records waiting in the local spool for the queue store",
                 stats.spool_backlog)):
            yield GaugeMetricFamily(name, text, value=float(value))
        for name, text, value in (
                ("oodguard_queue_accepted", "Records ever stored by the query queue", stats.accepted),
                ("oodguard_queue_rejected", "Records refused by the full query queue (policy reject)", stats.rejected),
                ("oodguard_queue_evicted", "Pending records evicted by the full query queue (policy evict-oldest)",
                 stats.evicted)):
            yield CounterMetricFamily(name, text, value=float(value))


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


def _status_name(context: grpc.aio.ServicerContext | None) -> str:
    try:
        code = context.code() if context is not None else None
    except Exception:  # noqa: BLE001
        code = None
    if isinstance(code, grpc.StatusCode):
        return code.name
    return "UNKNOWN"


class GatewayMetrics:
    """Every metric object of one gateway, and the hooks the server calls."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
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
        self.scores = _ScoreHistograms()
        r.register(self.scores)
        # children of the request-path metrics, by label values
        self._requests, self._request_seconds = _Children(self.requests), _Children(self.request_seconds)
        self._backend_seconds, self._items = _Children(self.backend_seconds), _Children(self.items)
        self._flagged_items, self._flagged = _Children(self.flagged_items), _Children(self.flagged)
        self._gateway: Any = None
        self._server = None
        self._thread: threading.Thread | None = None

    def bind(self, gateway: Any) -> None:
        """Export the gateway's state (registry snapshot, health, queue statistics) at scrape time."""
        self._gateway = gateway
        self.registry.register(_StateCollector(gateway))

    # -- hooks ----------------------------------------------------------------------------------
    def _labels_of_request(self, request: Any) -> tuple[str, str]:
        """Bounded labels of a failed request: a served model/version, else ``unknown``."""
        try:
            served = self._gateway.registry.resolve(request.model, request.version or None)
            return served.model, str(served.version)
        except Exception:  # noqa: BLE001
            return UNKNOWN_MODEL, ""

    async def track_predict(self, request: Any, context: grpc.aio.ServicerContext, call: Awaitable) -> Any:
        """Await ``call`` (the Predict handler) and count it by model, version and status, with its latency."""
        started = time.perf_counter()
        response = None
        code = "OK"
        try:
            response = await call
            return response
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except BaseException:
            code = _status_name(context)
            raise
        finally:
            if response is not None:
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
        """Count a batch's items, flagged items and the deciding scores that flagged them; record every score."""
        if not len(decisions):
            return
        model, version = served.model, str(served.version)
        self._items(model, version).inc(len(decisions))
        flagged = int(decisions.ood.sum())
        if flagged:
            self._flagged_items(model, version).inc(flagged)
            for name in decisions.deciding:
                count = int(decisions.crossed[decisions.ood, decisions.names.index(name)].sum())
                if count:
                    self._flagged(model, version, name).inc(count)
        self.scores.observe(served, decisions.names, decisions.scores)

    def auth_failed(self, reason: str) -> None:
        self.auth_failures.labels(reason).inc()

    # -- HTTP endpoint --------------------------------------------------------------------------
    def start_server(self, port: int, addr: str = "127.0.0.1") -> int:
        """Serve ``/metrics`` on ``addr:port`` in a daemon thread; returns the port."""
        self._server, self._thread = start_metrics_server(port, addr, self.registry)
        return int(self._server.server_port)

    def stop_server(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None


def start_metrics_server(port: int, addr: str = "0.0.0.0", registry: CollectorRegistry | None = None):
    """Serve the metrics of ``registry`` (default: prometheus_client's global one) over HTTP on
    ``addr:port`` in a daemon thread; returns ``(server, thread)`` (``server.shutdown()`` stops it)."""
    from prometheus_client import REGISTRY

    addr = addr.strip("[]") or "0.0.0.0"
    return start_http_server(port, addr=addr, registry=REGISTRY if registry is None else registry)


__all__ = ["GatewayMetrics", "start_metrics_server", "score_buckets", "expected_flag_rates", "LATENCY_BUCKETS"]
