"""Nothing acknowledged is lost: `oodguard serve` (embedded backend, digits repository) under sustained
concurrent load of uniform noise (flagged, so queued) while redis-server is stopped and restarted, and while
the gateway itself is SIGKILLed and restarted (SQLite and Redis queues), with one gateway process and with
``--workers 2`` (two processes writing the same SQLite file, each with its own Redis spool; the SIGKILL takes the
supervisor and every worker at once). Every record id that Predict returned must end up in the queue exactly once.
Every process is stopped by PID."""

from __future__ import annotations

import collections
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import redis

from oodguard.clients.gateway_process import GatewayProcess
from oodguard.queues.redis_streams import DEFAULT_PREFIX
from oodguard.queues.sqlite import SQLiteQueue
from oodguard.serve.v1 import oodguard_pb2 as pb
from oodguard.serve.v1 import oodguard_pb2_grpc as pb_grpc


def start_gateway(repository: Path, queue_url: str, workdir: Path, name: str, workers: int = 1) -> GatewayProcess:
    """``oodguard serve`` on a free loopback port, SERVING; ``kill()`` is SIGKILL of its whole process group (the
    supervisor and its workers), ``stop()`` SIGTERM (its exit status)."""
    return GatewayProcess(repository, ["--queue-url", queue_url, "--queue-spool-path", workdir / "spool",
                                       "--max-wait-ms", "2", "--intra-op-threads", "1", "--drain-timeout-s", "5"],
                          work=workdir, name=name, workers=workers, stop_timeout_s=20).start()


class Load:
    """``threads`` clients sending batches of uniform noise until ``stop()``; collects queued record ids."""

    def __init__(self, target: str, threads: int = 3, batch: int = 4):
        self.target, self.batch = target, batch
        self.ids: list[str] = []
        self.errors: collections.Counter = collections.Counter()
        self.requests = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(n,), daemon=True) for n in range(threads)]
        for t in self._threads:
            t.start()

    def _run(self, n: int) -> None:
        rng = np.random.default_rng(n)
        # a connection per thread (equal channels share one): with several workers the kernel spreads them
        with grpc.insecure_channel(self.target, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            stub = pb_grpc.OODGuardStub(channel)
            while not self._stop.is_set():
                images = rng.integers(0, 256, size=(self.batch, 28, 28), dtype=np.uint8)
                request = pb.PredictRequest(tensor=pb.Tensor(dtype="uint8", shape=list(images.shape),
                                                             data=images.tobytes()))
                try:
                    response = stub.Predict(request, timeout=10)
                except grpc.RpcError as exc:
                    with self._lock:
                        self.errors[exc.code().name] += 1
                    time.sleep(0.05)
                    continue
                got = [p.queue_record_id for p in response.predictions if p.queue_status == pb.QUEUED]
                with self._lock:
                    self.ids += got
                    self.requests += 1

    def count(self) -> int:
        with self._lock:
            return len(self.ids)

    def wait_more(self, n: int, min_s: float = 1.0, timeout_s: float = 20.0) -> None:
        """Wait at least ``min_s`` and until at least ``n`` more ids have come back (the load really flows)."""
        target = self.count() + n
        began = time.monotonic()
        deadline = began + timeout_s
        while self.count() < target or time.monotonic() - began < min_s:
            assert time.monotonic() < deadline, f"load stalled: {self.count()} ids, errors {dict(self.errors)}"
            time.sleep(0.05)

    def stop(self) -> list[str]:
        self._stop.set()
        for t in self._threads:
            t.join(20)
        return list(self.ids)


def stream_counts(url: str) -> collections.Counter:
    client = redis.Redis.from_url(url)
    try:
        return collections.Counter(f[b"id"].decode() for _, f in client.xrange(f"{DEFAULT_PREFIX}:stream"))
    finally:
        client.close()


def wait_all_in_stream(url: str, ids: list[str], timeout_s: float = 20.0) -> collections.Counter:
    deadline = time.monotonic() + timeout_s
    while True:
        counts = stream_counts(url)
        if set(ids) <= set(counts) or time.monotonic() > deadline:
            return counts
        time.sleep(0.1)


@pytest.fixture
def workdir(tmp_path) -> Path:
    path = tmp_path / "work"
    path.mkdir()
    return path


@pytest.mark.parametrize("workers", [1, 2])
def test_redis_stopped_and_restarted_under_load_every_record_lands_once(workers, redis_server, digits_export, workdir):
    gateway = start_gateway(digits_export[2], redis_server.url, workdir, "gateway", workers)
    load = None
    try:
        load = Load(gateway.target, threads=4)
        load.wait_more(40)
        redis_server.stop()
        load.wait_more(40)  # answered while Redis is down: spooled
        down_ids = load.count()
        redis_server.start()
        load.wait_more(40)
        ids = load.stop()
        assert load.errors == {}, f"requests failed: {dict(load.errors)}"
        assert len(ids) > down_ids and len(set(ids)) == len(ids)
        counts = wait_all_in_stream(redis_server.url, ids)
        missing = set(ids) - set(counts)
        assert not missing, f"{len(missing)} of {len(ids)} acknowledged records are not in the stream"
        assert max(counts.values()) == 1, "a record landed twice"
        assert set(counts) == set(ids)
        assert gateway.stop() == 0
        log = gateway.log()
        assert "spooling to" in log and "replayed" in log, log[-3000:]
        spools = sorted(workdir.glob("spool*"))
        assert [p.name for p in spools] == ["spool", "spool.w1"][:workers]  # one spool per worker
        assert all(p.stat().st_size == 0 for p in spools)
    finally:
        if load is not None:
            load.stop()
        gateway.kill()


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_gateway_sigkill_under_load_loses_no_acknowledged_record(backend, workers, redis_server, digits_export, workdir):
    # the SQLite URL is relative: the gateway runs in workdir, where the file must land (not at the root)
    url = "sqlite:///queue.sqlite" if backend == "sqlite" else redis_server.url
    gateway = start_gateway(digits_export[2], url, workdir, "gateway", workers)
    load = restarted = None
    try:
        load = Load(gateway.target, threads=4)
        load.wait_more(40)
        if backend == "redis":  # the kill comes while records sit in the spool only
            redis_server.stop()
            load.wait_more(40)
        gateway.kill()
        ids = load.stop()
        assert ids and len(set(ids)) == len(ids)
        if backend == "redis":
            assert sum(p.stat().st_size for p in workdir.glob("spool*")) > 0
            redis_server.start()
        # restarted with one process: worker 0 takes over the spool of worker 1 too
        restarted = start_gateway(digits_export[2], url, workdir, "restarted")
        if backend == "sqlite":
            queue = SQLiteQueue(workdir / "queue.sqlite", create=False)  # where the relative URL points
            try:
                found = {r.id for r in queue.get(ids)}
            finally:
                queue.close()
            assert found == set(ids), f"{len(set(ids) - found)} of {len(ids)} acknowledged records lost"
        else:
            counts = wait_all_in_stream(redis_server.url, ids)  # the restarted gateway replays the spool
            missing = set(ids) - set(counts)
            assert not missing, f"{len(missing)} of {len(ids)} acknowledged records lost"
            assert max(counts.values()) == 1
        assert restarted.stop() == 0
    finally:
        if load is not None:
            load.stop()
        gateway.kill()
        if restarted is not None:
            restarted.kill()
