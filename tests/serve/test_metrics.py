"""Prometheus metrics of a real gateway on the digits model: scrape the HTTP endpoint after ID and noise
traffic and check the counters, the threshold gauges and the calibration-derived histogram buckets. Then
the queue metrics during a store outage (a stand-in queue whose statistics hang, and a real Redis stopped or
frozen), the fail-closed and refusal counters, and the endpoint's bind address, HTTPS and basic auth."""

from __future__ import annotations

import asyncio
import base64
import math
import os
import signal
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request
from types import SimpleNamespace

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from oodguard.calibration import Calibration
from oodguard.serve.decision import DecisionPolicy, DecisionRule
from oodguard.serve.embedded import EmbeddedBackend
from oodguard.serve.metrics import (BAD_REQUEST_REASONS, REFUSED_REASONS, GatewayMetrics, expected_flag_rates,
                                    score_buckets)
from oodguard.queues.base import LocalQueueState, QueryQueue, QueueError, QueueStats
from oodguard.queues.redis_streams import RedisQueue
from oodguard.serve.v1 import oodguard_pb2 as pb
from oodguard.serve.v1 import oodguard_pb2_grpc as pb_grpc

from .conftest import free_port
from .test_server import FlakyBackend, noise, tensor
from queues.store_checks import record


def get(url: str, auth: str | None = None, context: ssl.SSLContext | None = None,
        authorization: str | None = None) -> tuple[int, dict, bytes]:
    """(status, headers, body) of a GET; ``auth`` = ``user:password`` sent as basic auth."""
    request = urllib.request.Request(url)
    if auth is not None:
        authorization = "Basic " + base64.b64encode(auth.encode()).decode()
    if authorization is not None:
        request.add_header("Authorization", authorization)
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def parse(text: str) -> dict[str, list]:
    families: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        families.setdefault(family.name, []).extend(family.samples)
    return families


def scrape(port: int) -> tuple[str, dict[str, list]]:
    """(the text, family name → samples) of the gateway's /metrics."""
    status, _, body = get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200
    text = body.decode()
    return text, parse(text)


def timed_scrape(port: int) -> tuple[float, dict[str, list]]:
    """(seconds the scrape took, family name → samples)."""
    started = time.perf_counter()
    _, fam = scrape(port)
    return time.perf_counter() - started, fam


def scrape_until(port: int, condition, timeout_s: float = 10.0, what: str = "condition") -> dict[str, list]:
    """Scrape until ``condition(families)`` holds (the queue statistics arrive from a thread of their own)."""
    deadline = time.monotonic() + timeout_s
    while True:
        _, fam = scrape(port)
        if condition(fam):
            return fam
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def maybe(families, sample_name: str, **labels) -> float | None:
    """The value of one sample, or None when absent."""
    found = samples(families, sample_name, **labels)
    assert len(found) <= 1
    return found[0].value if found else None


def value(families, sample_name: str, **labels) -> float:
    family = sample_name
    for suffix in ("_total", "_bucket", "_count", "_sum"):
        if sample_name.endswith(suffix):
            family = sample_name[: -len(suffix)]
    found = [s.value for s in families.get(family, []) if s.name == sample_name
             and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, f"{sample_name}{labels}: {len(found)} samples"
    return found[0]


def samples(families, sample_name: str, **labels) -> list:
    family = sample_name.rsplit("_", 1)[0] if sample_name.endswith(("_bucket", "_count", "_sum", "_total")) else sample_name
    return [s for s in families.get(family, []) if s.name == sample_name
            and all(s.labels.get(k) == v for k, v in labels.items())]


def test_metrics_after_id_and_noise_traffic(start_gateway, repo_copy, digits_test_images):
    port = free_port()
    gw = start_gateway(repo_copy, metrics_port=port, decision_scores=("sisome", "energy"), decision_mode="any")
    assert gw.gateway.metrics_port == port
    cal = Calibration.load(repo_copy / "digits" / "1" / "calibration.json")
    images = digits_test_images[0][:96]
    predictions, writes = [], 0  # writes: requests with a flagged item (one queue write each)
    with grpc.insecure_channel(gw.target) as channel:
        stub = pb_grpc.OODGuardStub(channel)
        for start in range(0, len(images), 32):
            response = stub.Predict(pb.PredictRequest(tensor=tensor(images[start:start + 32]),
                                                      request_id=f"secret-request-{start}"), timeout=10)
            predictions.extend(response.predictions)
            writes += any(p.decision.ood for p in response.predictions)
        for seed in range(2):
            response = stub.Predict(pb.PredictRequest(tensor=tensor(noise(16, seed)), request_id=f"secret-noise-{seed}",
                                                      metadata={"camera": "north"}), timeout=10)
            predictions.extend(response.predictions)
            writes += any(p.decision.ood for p in response.predictions)
        for bad in (pb.PredictRequest(tensor=pb.Tensor(dtype="float64", shape=[1], data=b"\0" * 8)),
                    pb.PredictRequest(tensor=tensor(noise(1)), model="no-such-model-abc123")):
            with pytest.raises(grpc.RpcError) as info:
                stub.Predict(bad, timeout=10)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    n_items = len(predictions)
    flagged = [p for p in predictions if p.decision.ood]
    fam = scrape_until(port, lambda f: maybe(f, "oodguard_queue_accepted_total") == len(flagged),
                       what="the queue statistics")
    text, _ = scrape(port)
    # no request ids, client metadata or unknown model names in labels (bounded cardinality)
    assert "secret-" not in text and "north" not in text and "no-such-model" not in text

    # requests by model, version and gRPC status
    assert value(fam, "oodguard_requests_total", model="digits", version="1", code="OK") == 5
    assert value(fam, "oodguard_requests_total", model="digits", version="1", code="INVALID_ARGUMENT") == 1
    assert value(fam, "oodguard_requests_total", model="unknown", version="", code="INVALID_ARGUMENT") == 1
    assert value(fam, "oodguard_request_duration_seconds_count", model="digits") == 6
    assert value(fam, "oodguard_backend_duration_seconds_count", model="digits") == 5
    assert not samples(fam, "oodguard_backend_errors_total")

    # items, flagged items and the deciding score that flagged them
    assert n_items == 96 + 32 and len(flagged) >= 28  # (nearly) every noise item is flagged
    assert value(fam, "oodguard_items_total", model="digits", version="1") == n_items
    assert value(fam, "oodguard_flagged_items_total", model="digits", version="1") == len(flagged)
    for name in ("sisome", "energy"):
        crossed = sum(name in p.decision.crossed for p in flagged)
        got = samples(fam, "oodguard_flagged_total", model="digits", version="1", score=name)
        assert (got[0].value if got else 0) == crossed
    assert not samples(fam, "oodguard_flagged_total", score="msp")  # not a deciding score

    # thresholds and the calibrated flag rate (p0) from the calibration
    for name, t in cal.thresholds.items():
        deciding = "true" if name in ("sisome", "energy") else "false"
        assert value(fam, "oodguard_threshold", model="digits", version="1", score=name, deciding=deciding) == \
            pytest.approx(t.threshold, rel=1e-12)
    p0 = sum((cal.thresholds[n].n + 1 - cal.thresholds[n].accepted) / (cal.thresholds[n].n + 1) for n in ("sisome", "energy"))
    assert value(fam, "oodguard_calibrated_flag_rate", model="digits", version="1") == pytest.approx(p0)
    upper = value(fam, "oodguard_calibrated_flag_rate_upper", model="digits", version="1")
    assert p0 < upper <= 1.0
    assert value(fam, "oodguard_model_info", model="digits", version="1", latest="true", backend="embedded") == 1
    assert value(fam, "oodguard_serving") == 1

    # per-score histograms: bucket bounds from the calibration (the threshold among them), every item counted
    for name, t in cal.thresholds.items():
        buckets = samples(fam, "oodguard_score_bucket", model="digits", version="1", score=name)
        bounds = [float(s.labels["le"]) for s in buckets]
        assert bounds == list(score_buckets(t))
        assert bounds[-1] == math.inf and len(bounds) >= 10
        assert t.threshold in bounds
        calib = t.sorted_scores
        assert bounds[0] <= np.quantile(calib, 0.02) and max(b for b in bounds if b < math.inf) > calib[-1]
        # (_count and _sum exist only where every bound is >= 0, as OpenMetrics wants; +Inf is the count)
        if bounds[0] >= 0:
            assert value(fam, "oodguard_score_count", model="digits", version="1", score=name) == n_items
        counts = [s.value for s in buckets]
        assert counts == sorted(counts) and counts[-1] == n_items
        scores = np.array([p.scores[name] for p in predictions])
        at = bounds.index(t.threshold)
        # the bucket at the threshold holds exactly the items that did not cross it
        assert counts[at] == sum(name not in p.decision.crossed for p in predictions)
        if bounds[0] >= 0:
            assert value(fam, "oodguard_score_sum", model="digits", version="1", score=name) == \
                pytest.approx(float(scores.sum()), rel=1e-4, abs=1e-3)

    # the queue: one write per request with flagged items, depth and the queue's own counters
    assert value(fam, "oodguard_queue_write_duration_seconds_count", model="digits") == writes
    assert value(fam, "oodguard_queue_size") == len(flagged)
    assert value(fam, "oodguard_queue_accepted_total") == len(flagged)
    assert value(fam, "oodguard_queue_rejected_total") == 0 and value(fam, "oodguard_queue_evicted_total") == 0
    assert value(fam, "oodguard_queue_spool_backlog") == 0 and value(fam, "oodguard_queue_stats_up") == 1
    assert value(fam, "oodguard_queue_reachable") == 1
    assert value(fam, "oodguard_queue_max_size") == gw.settings.queue_max_size
    assert value(fam, "oodguard_queue_max_bytes") == gw.settings.queue_max_bytes
    assert value(fam, "oodguard_queue_bytes") > 0
    assert not samples(fam, "oodguard_queue_write_failures_total")


def test_a_version_decided_by_the_fallback_reports_its_own_deciding_scores_and_p0(start_gateway, repo_copy):
    """Version 2 was exported without fused: the default policy decides it by sisome, and /metrics says so (its
    deciding threshold and p0 are sisome's) while version 1 reports fused's."""
    import json
    import shutil

    shutil.copytree(repo_copy / "digits" / "1", repo_copy / "digits" / ".staging-2")
    path = repo_copy / "digits" / ".staging-2" / "calibration.json"
    raw = json.loads(path.read_text())
    raw["model"]["scores"].remove("fused")
    del raw["scores"]["fused"]
    path.write_text(json.dumps(raw))
    (repo_copy / "digits" / ".staging-2").rename(repo_copy / "digits" / "2")
    port = free_port()
    start_gateway(repo_copy, metrics_port=port)
    fam = scrape_until(port, lambda f: len(samples(f, "oodguard_calibrated_flag_rate")) == 2, what="both versions")
    cal = Calibration.load(repo_copy / "digits" / "1" / "calibration.json")
    for version, deciding in (("1", "fused"), ("2", "sisome")):
        t = cal.thresholds[deciding]
        assert value(fam, "oodguard_threshold", model="digits", version=version, score=deciding, deciding="true") == \
            pytest.approx(t.threshold, rel=1e-12)
        assert value(fam, "oodguard_calibrated_flag_rate", model="digits", version=version) == \
            pytest.approx((t.n + 1 - t.accepted) / (t.n + 1))
    assert not samples(fam, "oodguard_threshold", version="2", score="fused")


def test_backend_errors_and_queue_rejections_are_counted(start_gateway, repo_copy):
    backends = []

    def factory(settings):
        backends.append(FlakyBackend(EmbeddedBackend(settings.repository)))
        return backends[0]

    port = free_port()
    gw = start_gateway(repo_copy, backend_factory=factory, metrics_port=port, queue_max_size=3, poll_interval_s=30)
    with grpc.insecure_channel(gw.target) as channel:
        stub = pb_grpc.OODGuardStub(channel)
        response = stub.Predict(pb.PredictRequest(tensor=tensor(noise(8))), timeout=10)
        refused = sum(p.queue_status == pb.REJECTED_QUEUE_FULL for p in response.predictions)
        assert refused >= 1
        backends[0].down = True
        with pytest.raises(grpc.RpcError) as info:
            stub.Predict(pb.PredictRequest(tensor=tensor(noise(1))), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    # the client sees the aborted call's status a moment before the handler's bookkeeping ends, and the queue
    # statistics come from their own thread: poll briefly
    fam = scrape_until(port, lambda f: maybe(f, "oodguard_requests_total", code="UNAVAILABLE") is not None
                       and maybe(f, "oodguard_queue_rejected_total") == refused, what="the aborted call and queue")
    assert value(fam, "oodguard_backend_errors_total", model="digits", reason="unavailable") == 1
    assert value(fam, "oodguard_requests_total", model="digits", version="1", code="UNAVAILABLE") == 1
    assert value(fam, "oodguard_backend_duration_seconds_count", model="digits") == 2
    assert value(fam, "oodguard_queue_rejected_items_total", model="digits") == refused
    assert value(fam, "oodguard_queue_rejected_total") == refused
    assert value(fam, "oodguard_serving") == 0


def test_metrics_off_by_default(start_gateway, repo_copy):
    gw = start_gateway(repo_copy)
    assert gw.gateway.metrics_port is None and gw.gateway.metrics._server is None
    assert gw.gateway.metrics._state.stats._thread is None  # and nobody reads the queue statistics


def test_score_buckets_and_expected_rates_from_a_calibration(digits_export):
    from oodguard.serve.decision import DecisionPolicy

    cal = Calibration.load(digits_export[2] / "digits" / "1" / "calibration.json")
    t = cal.thresholds["sisome"]
    bounds = score_buckets(t)
    assert list(bounds) == sorted(set(bounds)) and bounds[-1] == math.inf
    share_below_threshold = np.mean(t.sorted_scores <= t.threshold)
    assert share_below_threshold == pytest.approx(t.accepted / t.n)

    class Served:  # the fields expected_flag_rates reads
        calibration = cal

    one = expected_flag_rates(Served, DecisionPolicy(("sisome",), "any"))
    assert one[0] == pytest.approx((t.n + 1 - t.accepted) / (t.n + 1)) and 0.03 < one[0] < 0.08
    assert one[1] == pytest.approx(1 - t.achieved_tpr_ci95[0])
    both_any = expected_flag_rates(Served, DecisionPolicy(("sisome", "energy"), "any"))
    both_all = expected_flag_rates(Served, DecisionPolicy(("sisome", "energy"), "all"))
    assert both_all[0] <= one[0] <= both_any[0]


# --- the queue during a store outage -----------------------------------------------------------------

STATS = QueueStats(size=12, pending=10, claimed=2, sent=5, flagged=11, sampled=1, max_size=100, full_policy="reject",
                   accepted=40, rejected=3, evicted=1, bytes=3456, max_bytes=1_000_000)


class StubQueue(QueryQueue):
    """``stats()`` answers :data:`STATS` after ``read_s``, hangs (up to 5 s, as a Redis socket timeout) while
    ``responsive`` is clear, and raises while ``fail``; ``local_state()`` says 7 spooled records, unreachable."""

    put = get = select = claim = claim_ids = release = mark_sent = purge_sent = summary = delete = None  # never called

    def __init__(self, read_s: float = 0.0):
        self.read_s, self.fail, self.reads = read_s, False, 0
        self.responsive = threading.Event()
        self.responsive.set()

    def stats(self) -> QueueStats:
        self.reads += 1
        time.sleep(self.read_s)
        self.responsive.wait(5.0)
        if self.fail:
            raise QueueError("store down")
        return STATS

    def local_state(self) -> LocalQueueState:
        return LocalQueueState(spool_backlog=7, reachable=False)

    def close(self) -> None:
        pass


def bound_metrics(queue: QueryQueue, interval_s: float = 0.05) -> GatewayMetrics:
    """GatewayMetrics bound to a stand-in gateway that serves no model and has ``queue`` as its query queue."""
    gateway = SimpleNamespace(policy=DecisionPolicy(("sisome",), "any"), settings=SimpleNamespace(backend="embedded"),
                              registry=SimpleNamespace(snapshot=SimpleNamespace(versions={})), _serving=True,
                              queue=queue)
    metrics = GatewayMetrics(queue_stats_interval_s=interval_s)
    metrics.bind(gateway)
    return metrics


@pytest.fixture
def serve_metrics():
    """``serve_metrics(metrics, host="127.0.0.1", **security) -> port``; every endpoint stopped at the end."""
    started: list[GatewayMetrics] = []

    def start(metrics: GatewayMetrics, host: str = "127.0.0.1", **security) -> int:
        port = metrics.start_server(0, host, **security)
        started.append(metrics)
        return port

    yield start
    for metrics in started:
        metrics.stop_server()


#: the families that come from the store's statistics (absent while they cannot be read)
STORE_STATS = ("oodguard_queue_size", "oodguard_queue_pending", "oodguard_queue_max_size", "oodguard_queue_bytes",
               "oodguard_queue_max_bytes", "oodguard_queue_accepted", "oodguard_queue_rejected",
               "oodguard_queue_evicted")


def test_a_scrape_never_waits_on_hung_queue_statistics(serve_metrics):
    queue = StubQueue()
    queue.responsive.clear()  # the first read hangs
    metrics = bound_metrics(queue, interval_s=0.05)  # a read is stuck after 3 intervals: 0.15 s
    port = serve_metrics(metrics)
    took, fam = timed_scrape(port)
    assert took < 0.5
    # the spool backlog and reachability come from the queue's memory: there, with the right values
    assert value(fam, "oodguard_queue_spool_backlog") == 7 and value(fam, "oodguard_queue_reachable") == 0
    assert value(fam, "oodguard_queue_stats_up") == 0 and not set(STORE_STATS) & set(fam)

    queue.responsive.set()
    fam = scrape_until(port, lambda f: maybe(f, "oodguard_queue_stats_up") == 1, what="stats up")
    assert (value(fam, "oodguard_queue_size"), value(fam, "oodguard_queue_pending"),
            value(fam, "oodguard_queue_max_size")) == (12, 10, 100)
    assert (value(fam, "oodguard_queue_bytes"), value(fam, "oodguard_queue_max_bytes")) == (3456, 1_000_000)
    assert (value(fam, "oodguard_queue_accepted_total"), value(fam, "oodguard_queue_rejected_total"),
            value(fam, "oodguard_queue_evicted_total")) == (40, 3, 1)
    assert value(fam, "oodguard_queue_spool_backlog") == 7

    def seconds_until_down() -> float:
        """Hang the store; seconds until the scrapes say stats down (each scrape under 0.5 s, no stale values)."""
        queue.responsive.clear()
        hung_at = time.monotonic()
        while True:
            took, fam = timed_scrape(port)
            assert took < 0.5
            if value(fam, "oodguard_queue_stats_up") == 0:
                assert not set(STORE_STATS) & set(fam) and value(fam, "oodguard_queue_spool_backlog") == 7
                return time.monotonic() - hung_at
            assert time.monotonic() - hung_at < 2.0, "statistics still up 2 s into a hung read"

    # a read that hangs: stats down once it is stuck (about one interval to start + 3 intervals)
    assert seconds_until_down() < 1.0
    # the hang ends (that read succeeds after 0.3 s): up at once, and the next hang is seen as soon (one slow
    # read does not make the reads rarer)
    time.sleep(0.3)
    queue.responsive.set()
    scrape_until(port, lambda f: maybe(f, "oodguard_queue_stats_up") == 1, timeout_s=1.0, what="stats up")
    assert seconds_until_down() < 1.0

    # a read that fails: down at once, and up again once the store answers
    queue.fail = True
    queue.responsive.set()
    time.sleep(0.2)
    assert value(scrape(port)[1], "oodguard_queue_stats_up") == 0
    queue.fail = False  # (a failed read does not slow the reads down: the next one comes after 0.05 s)
    scrape_until(port, lambda f: maybe(f, "oodguard_queue_size") == 12, timeout_s=1.0, what="stats back")

    thread = metrics._state.stats._thread
    metrics.stop_server()
    assert not thread.is_alive()  # the statistics thread stops with the endpoint


def test_slow_queue_statistics_are_read_less_often():
    # a read of 0.1 s (SQLite counting 100k records holds the queue's lock that long) comes at most every
    # 0.1 / QUEUE_STATS_MAX_DUTY = 2 s, however short the minimum interval, and stays up meanwhile
    queue = StubQueue(read_s=0.1)
    metrics = bound_metrics(queue, interval_s=0.01)
    metrics._state.stats.start()
    try:
        time.sleep(1.5)
        assert queue.reads == 1
        assert metrics.registry.get_sample_value("oodguard_queue_stats_up") == 1
        assert metrics.registry.get_sample_value("oodguard_queue_size") == 12
    finally:
        metrics._state.stats.close()


def wait_for(condition, timeout_s: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_spool_backlog_and_reachability_while_redis_is_stopped(redis_server, tmp_path, serve_metrics):
    queue = RedisQueue(redis_server.url, tmp_path / "spool", connect_retry_s=0.1)
    try:
        metrics = bound_metrics(queue, interval_s=0.1)
        port = serve_metrics(metrics)
        assert all(queue.put([record(i) for i in range(2)]))
        scrape_until(port, lambda f: maybe(f, "oodguard_queue_size") == 2, what="2 records in Redis")

        redis_server.stop()
        assert all(queue.put([record(i) for i in range(2, 5)]))  # acknowledged into the local spool
        fam = scrape_until(port, lambda f: maybe(f, "oodguard_queue_stats_up") == 0, what="stats down")
        took, fam = timed_scrape(port)
        assert took < 0.5
        assert value(fam, "oodguard_queue_spool_backlog") == 3 and value(fam, "oodguard_queue_reachable") == 0
        assert not set(STORE_STATS) & set(fam)  # no stale store statistics

        redis_server.start()  # the spool drains into Redis
        fam = scrape_until(port, lambda f: maybe(f, "oodguard_queue_size") == 5, timeout_s=20, what="spool replayed")
        assert value(fam, "oodguard_queue_spool_backlog") == 0 and value(fam, "oodguard_queue_reachable") == 1
        assert value(fam, "oodguard_queue_stats_up") == 1
    finally:
        queue.close()


def test_a_scrape_is_fast_while_redis_hangs(redis_server, tmp_path, serve_metrics):
    queue = RedisQueue(redis_server.url, tmp_path / "spool", connect_retry_s=0.1)
    try:
        metrics = bound_metrics(queue, interval_s=0.2)
        port = serve_metrics(metrics)
        assert all(queue.put([record(0)]))
        scrape_until(port, lambda f: maybe(f, "oodguard_queue_size") == 1, what="the record in Redis")
        os.kill(redis_server.process.pid, signal.SIGSTOP)  # Redis accepts connections but never answers
        try:
            frozen_at = time.monotonic()
            durations = []
            while True:
                took, fam = timed_scrape(port)
                durations.append(took)
                if value(fam, "oodguard_queue_stats_up") == 0:
                    break
                assert time.monotonic() - frozen_at < 3.0, "statistics still up 3 s into a hung Redis"
            assert max(durations) < 0.5 and maybe(fam, "oodguard_queue_size") is None
            assert value(fam, "oodguard_queue_spool_backlog") == 0
        finally:
            os.kill(redis_server.process.pid, signal.SIGCONT)
        scrape_until(port, lambda f: maybe(f, "oodguard_queue_stats_up") == 1, what="stats back")
    finally:
        queue.close()


# --- items that failed closed, refusals, statuses --------------------------------------------------------

def test_items_that_failed_closed_are_counted(digits_export):
    cal = Calibration.load(digits_export[2] / "digits" / "1" / "calibration.json")
    rule = DecisionRule(cal, DecisionPolicy(("sisome",), "any"))
    served = SimpleNamespace(model="digits", version=1, calibration=cal)
    # 6 items whose scores sit at each score's lowest calibration value (not flagged by the thresholds);
    # items 1 and 2 have a NaN score, items 2, 3 and 4 an input out of range
    outputs = {name: np.full(6, cal.thresholds[name].sorted_scores[0], np.float32) for name in rule.names}
    outputs[rule.names[-1]][[1, 2]] = np.nan
    out_of_range = np.array([False, False, True, True, True, False])
    decisions = rule(outputs, out_of_range)
    assert not decisions.by_policy.any()
    metrics = GatewayMetrics()
    metrics.observe_decisions(served, decisions)
    metrics.observe_decisions(served, rule(outputs))  # the same scores, inputs in range

    def sample(name: str) -> float:
        return metrics.registry.get_sample_value(name, {"model": "digits", "version": "1"})

    assert sample("oodguard_items_total") == 12
    assert sample("oodguard_unscorable_items_total") == 4
    assert sample("oodguard_input_out_of_range_items_total") == 3
    assert sample("oodguard_flagged_items_total") == 4 + 2  # 1, 2, 3, 4 and then 1, 2 again
    assert metrics.registry.get_sample_value("oodguard_flagged_total",
                                             {"model": "digits", "version": "1", "score": "sisome"}) is None


def test_refusals_and_bad_requests_are_counted_by_a_bounded_reason():
    metrics = GatewayMetrics()
    fam = parse(generate(metrics))
    # every reason is there from the start, at 0 (rate() sees the first refusal)
    assert {s.labels["reason"]: s.value for s in samples(fam, "oodguard_refused_requests_total")} == \
        dict.fromkeys(REFUSED_REASONS, 0.0)
    assert {s.labels["reason"]: s.value for s in samples(fam, "oodguard_bad_requests_total")} == \
        dict.fromkeys(BAD_REQUEST_REASONS, 0.0)
    for reason in ("inflight_requests", "inflight_requests", "inflight_items", "decode_queue", "client-chose-this"):
        metrics.request_refused(reason)
    for reason in ("undecodable", "request_id_too_long", "metadata_too_large", "image_too_large", "image_format",
                   "reply_too_large", "image_too_large", "x" * 1000, "secret-request-42"):
        metrics.bad_request(reason)
    fam = parse(generate(metrics))
    assert {s.labels["reason"]: s.value for s in samples(fam, "oodguard_refused_requests_total")} == \
        {"inflight_requests": 2, "inflight_items": 1, "inflight_bytes": 0, "decode_queue": 1, "other": 1}
    assert {s.labels["reason"]: s.value for s in samples(fam, "oodguard_bad_requests_total")} == \
        {"undecodable": 1, "too_many_fields": 0, "request_id_too_long": 1, "metadata_too_large": 1, "image_too_large": 2,
         "image_format": 1, "image_structure": 0, "reply_too_large": 1, "other": 2}


def generate(metrics: GatewayMetrics) -> str:
    from prometheus_client import generate_latest

    return generate_latest(metrics.registry).decode()


def test_aborted_and_cancelled_calls_are_counted_with_their_status():
    metrics = GatewayMetrics()
    started = asyncio.Event()

    async def handler(request: bytes, context):
        async def predict():
            if request == b"busy":  # admission control
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many requests in flight")
            if request == b"set-code":
                context.set_code(grpc.StatusCode.RESOURCE_EXHAUSTED)
                return b""
            started.set()
            await asyncio.sleep(30)

        return await metrics.track_predict(request, context, predict())

    def count(code: str) -> float | None:
        return metrics.registry.get_sample_value("oodguard_requests_total",
                                                 {"model": "unknown", "version": "", "code": code})

    async def main():
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "test.Svc", {"Predict": grpc.unary_unary_rpc_method_handler(handler)}),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                predict = channel.unary_unary("/test.Svc/Predict")
                for body in (b"busy", b"busy", b"set-code"):
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await predict(body, timeout=10)
                    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                call = predict(b"slow", timeout=10)
                await asyncio.wait_for(started.wait(), 10)
                call.cancel()
                for _ in range(200):  # the handler's bookkeeping ends a moment after the client's cancel
                    if count("CANCELLED"):
                        break
                    await asyncio.sleep(0.01)
        finally:
            await server.stop(0)

    asyncio.run(main())
    assert count("RESOURCE_EXHAUSTED") == 3 and count("CANCELLED") == 1
    assert count("OK") is None and count("UNKNOWN") is None
    assert metrics.registry.get_sample_value("oodguard_request_duration_seconds_count", {"model": "unknown"}) == 4


# --- the endpoint: bind address, basic auth, HTTPS ---------------------------------------------------

PASSWORD = "pa:ss wörd"  # a colon and non-ASCII: basic auth splits at the first colon, UTF-8


@pytest.fixture
def auth_file(tmp_path):
    path = tmp_path / "metrics-auth"
    path.write_text(f"prometheus:{PASSWORD}\n", encoding="utf-8")
    return path


def test_basic_auth(serve_metrics, auth_file):
    metrics = bound_metrics(StubQueue())
    url = f"http://127.0.0.1:{serve_metrics(metrics, auth_file=auth_file)}/metrics"
    for auth in (None, "prometheus:wrong", "prometheus:" + PASSWORD[:-1], "other:" + PASSWORD, "prometheus"):
        status, headers, body = get(url, auth=auth)
        assert status == 401 and b"oodguard" not in body
        assert headers["WWW-Authenticate"].startswith('Basic realm="oodguard metrics"')
    for authorization in ("Bearer " + base64.b64encode(f"prometheus:{PASSWORD}".encode()).decode(), "Basic !!!",
                          "Basic"):
        assert get(url, authorization=authorization)[0] == 401
    status, _, body = get(url, auth=f"prometheus:{PASSWORD}")
    assert status == 200 and value(parse(body.decode()), "oodguard_queue_spool_backlog") == 7
    assert get(url, authorization="basic " + base64.b64encode(f"prometheus:{PASSWORD}".encode()).decode())[0] == 200


def test_https_with_basic_auth(serve_metrics, auth_file, tmp_path):
    from .test_auth import PKI  # skips without the cryptography package

    pki = PKI(tmp_path / "pki", "metrics")
    port = serve_metrics(bound_metrics(StubQueue()), tls_cert=pki.cert_path, tls_key=pki.key_path, auth_file=auth_file)
    url = f"https://127.0.0.1:{port}/metrics"
    trusted = ssl.create_default_context(cafile=str(pki.ca_path))
    # a client that connects and never speaks TLS does not hold up other scrapes
    with socket.create_connection(("127.0.0.1", port)):
        started = time.perf_counter()
        status, _, body = get(url, auth=f"prometheus:{PASSWORD}", context=trusted)
        assert time.perf_counter() - started < 1.0
    assert status == 200 and value(parse(body.decode()), "oodguard_queue_reachable") == 0
    assert get(url, context=trusted)[0] == 401
    with pytest.raises(urllib.error.URLError) as info:  # the certificate is checked: a client without the CA
        get(url, auth=f"prometheus:{PASSWORD}", context=ssl.create_default_context())
    assert isinstance(info.value.reason, ssl.SSLCertVerificationError)
    with pytest.raises((urllib.error.URLError, ConnectionError)):  # no plain HTTP on the TLS port
        get(f"http://127.0.0.1:{port}/metrics", auth=f"prometheus:{PASSWORD}")


def test_the_endpoint_binds_the_given_host(serve_metrics):
    port = serve_metrics(bound_metrics(StubQueue()), host="127.0.0.2")
    assert get(f"http://127.0.0.2:{port}/metrics")[0] == 200
    with pytest.raises(urllib.error.URLError) as info:  # not on another loopback address
        get(f"http://127.0.0.1:{port}/metrics")
    assert isinstance(info.value.reason, ConnectionRefusedError)


@pytest.mark.parametrize("content", ["", "no-colon\n", ":password\n", "user:\n", "a:b\nc:d\n"])
def test_a_bad_auth_file_stops_the_start(tmp_path, content):
    path = tmp_path / "auth"
    path.write_text(content)
    metrics = bound_metrics(StubQueue())
    with pytest.raises(ValueError, match="user:password"):
        metrics.start_server(0, "127.0.0.1", auth_file=path)
    assert metrics._server is None and metrics._state.stats._thread is None
