"""Fixtures of the gateway tests: a private copy of the digits repository and an in-process gateway
running on its own event loop in a thread (clients call it with plain synchronous gRPC)."""

from __future__ import annotations

import asyncio
import shutil
import socket
import threading
from pathlib import Path

import numpy as np
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


class LoopThread:
    """An asyncio event loop in a daemon thread; ``call`` runs a coroutine on it and waits."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def call(self, coro, timeout: float = 60.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class GatewayThread:
    """A :class:`oodguard.serve.server.Gateway` listening on 127.0.0.1 in its own loop thread."""

    def __init__(self, settings, backend_factory=None):
        from oodguard.serve.server import Gateway

        self.loop = LoopThread()
        self.settings = settings

        async def boot():
            backend = backend_factory(settings) if backend_factory else None
            gateway = Gateway(settings, backend=backend)
            try:
                await gateway.start()
            except BaseException:
                await gateway.stop(0)
                raise
            return gateway

        try:
            self.gateway = self.loop.call(boot())
        except BaseException:
            self.loop.close()
            raise
        self.target = f"127.0.0.1:{self.gateway.port}"

    def stop(self, grace: float = 2.0) -> None:
        try:
            self.loop.call(self.gateway.stop(grace))
        finally:
            self.loop.close()


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
