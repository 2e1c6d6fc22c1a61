"""Metrics read when scraped: every score's histogram with its calibration's buckets, the served versions'
thresholds and expected flag rates, the queue's state (from its own memory) and statistics (read by a thread
of their own, so a scrape never waits on the store)."""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np
from prometheus_client import Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from oodguard.queues.base import QueryQueue, QueueStats

from .definitions import (INFLIGHT_HELP, QUEUE_STATS_MAX_DUTY, QUEUE_STATS_MAX_PERIOD_S, QUEUE_STATS_STUCK_INTERVALS,
                          REACHABLE_HELP, SCORE_HELP, SERVING_HELP, SPOOL_HELP, expected_flag_rates, score_buckets)

if TYPE_CHECKING:  # pragma: no cover
    from ..registry import ServedVersion

log = logging.getLogger("oodguard.serve.metrics")


class LabelChildren:
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


class ScoreHistograms(Collector):
    """``oodguard_score``: one histogram per (model, version, score), each with its own calibration buckets
    (prometheus_client's Histogram has one bucket set per metric, hence this collector).

    The request path only appends each batch's ``[B, S]`` score matrix to a buffer (no NumPy work per
    request); the buffer is folded into the bucket counts at scrape time, or once it holds
    ``FOLD_ROWS`` rows, so memory stays bounded however rarely Prometheus scrapes."""

    FOLD_ROWS = 4096

    def __init__(self, parts: Gauge | None = None) -> None:
        #: multiprocess mode: every fold also adds its bucket counts to this gauge (labels model, version,
        #: score, le), which the metrics worker reads from the files
        self._parts = None if parts is None else LabelChildren(parts)
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


class QueueStatsPoller:
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


class StateCollector(Collector):
    """Read at scrape time: thresholds, calibrated flag rates, model info, serving state, the queue's local
    state, and the last queue statistics of :class:`QueueStatsPoller` (nothing here waits on the queue)."""

    def __init__(self, gateway: Any, stats_interval_s: float) -> None:
        self.gateway = gateway
        self.stats = QueueStatsPoller(gateway.queue, stats_interval_s)
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
