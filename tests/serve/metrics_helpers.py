"""What the metrics tests share: reading ``/metrics`` (a GET, the exposition parsed, one sample's value) and
a stand-in queue whose statistics hang or fail, bound to a :class:`GatewayMetrics` of a gateway that serves no
model."""

from __future__ import annotations

import base64
import ssl
import threading
import time
import urllib.error
import urllib.request
from types import SimpleNamespace

from prometheus_client.parser import text_string_to_metric_families

from oodguard.queues.base import LocalQueueState, QueryQueue, QueueError, QueueStats
from oodguard.serve.decision import DecisionPolicy
from oodguard.serve.metrics import GatewayMetrics


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


def generate(metrics: GatewayMetrics) -> str:
    from prometheus_client import generate_latest

    return generate_latest(metrics.registry).decode()


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
