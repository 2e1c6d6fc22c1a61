"""Fixtures of the gateway tests: a private copy of the digits repository and an in-process gateway
running on its own event loop in a thread (clients call it with plain synchronous gRPC)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from gateway_fixtures import GatewayThread, LoopThread, free_port  # noqa: F401 (re-exported to the tests)


def copy_repository(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


@pytest.fixture
def repo_copy(digits_export, tmp_path) -> Path:
    """A copy of the exported digits repository that a test may change (add versions, break files)."""
    return copy_repository(digits_export[2], tmp_path / "repo")


@pytest.fixture(scope="session")
def digits_test_images(digits_export) -> tuple[np.ndarray, np.ndarray]:
    """Held-out ID test images (uint8 [N,8,8], digits 0-7) and their labels."""
    record = digits_export[0]
    part = record.part(record.dataset(), "test")
    return part.images, part.labels


@pytest.fixture
def start_gateway(tmp_path):
    """``start_gateway(repository, **settings) -> GatewayThread``; stopped at the end of the test."""
    from oodguard.serve.settings import Settings

    started: list[GatewayThread] = []

    def start(repository: Path, backend_factory=None, **overrides) -> GatewayThread:
        values = dict(repository=repository, listen="127.0.0.1:0", queue_path=tmp_path / f"queue{len(started)}.sqlite",
                      poll_interval_s=0.2, max_wait_ms=2.0)
        values.update(overrides)
        gateway = GatewayThread(Settings(**values), backend_factory)
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        gateway.stop(0.5)


@pytest.fixture
def serve_metrics():
    """``serve_metrics(metrics, host="127.0.0.1", **security) -> port``: a :class:`GatewayMetrics`'s ``/metrics``
    endpoint started on a free port; every endpoint stopped at the end."""
    from oodguard.serve.metrics import GatewayMetrics

    started: list[GatewayMetrics] = []

    def start(metrics: GatewayMetrics, host: str = "127.0.0.1", **security) -> int:
        port = metrics.start_server(0, host, **security)
        started.append(metrics)
        return port

    yield start
    for metrics in started:
        metrics.stop_server()
