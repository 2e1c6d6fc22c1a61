"""The real gateway over a real tritonserver (tests/integration/conftest.py), both on 127.0.0.1 free ports.

* the embedded and the Triton backend give the same answers on the same repository;
* a Triton outage is UNAVAILABLE (naming the cause) and NOT_SERVING, and the same gateway recovers when the
  server comes back, without losing what it had queued;
* a very short client deadline is DEADLINE_EXCEEDED, leaves health alone, and the next call succeeds.

The tritonserver is shared by the module; the outage test kills and restarts it and leaves it running.
"""

from __future__ import annotations

import logging
import os
import signal
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway_fixtures import GatewayThread

from oodguard.calibration import Calibration
from oodguard.repository import CALIBRATION_FILE
from oodguard.serve.settings import Settings
from oodguard.serve.v1 import oodguard_pb2 as pb
from oodguard.serve.v1 import oodguard_pb2_grpc as pb_grpc

MODEL = "digits"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
OUTAGE_LIMIT_S = 20.0


# -- a gateway in its own event-loop thread (clients use plain synchronous gRPC) --------------------
@pytest.fixture
def start_gateway(tmp_path):
    """``start_gateway(name, repository, **settings) -> GatewayThread``; every gateway stops at the end."""
    started: list[GatewayThread] = []

    def start(name: str, repository: Path, **overrides) -> GatewayThread:
        values = dict(repository=repository, listen="127.0.0.1:0", queue_path=tmp_path / f"{name}-queue.sqlite",
                      poll_interval_s=0.2, max_wait_ms=1.0)
        values.update(overrides)
        gateway = GatewayThread(Settings(**values))
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        gateway.stop()


def ensure_running(triton_server) -> None:
    """Restart the shared tritonserver if an earlier test left it down."""
    if triton_server.process is None or triton_server.process.poll() is not None:
        triton_server.restart()


@pytest.fixture
def triton_gateway(start_gateway, triton_server):
    """A gateway with the Triton backend on the shared server (which is running when the test starts)."""
    ensure_running(triton_server)
    return start_gateway("triton", triton_server.repository, backend="triton", triton_url=triton_server.url)


@pytest.fixture(scope="module")
def held_out_digits(digits_export) -> np.ndarray:
    """Held-out in-distribution digits (the training record's test split), raw uint8 [N,8,8]."""
    record = digits_export[0]
    return record.part(record.dataset(), "test").images


# -- helpers --------------------------------------------------------------------------------------
def tensor(array: np.ndarray) -> pb.Tensor:
    array = np.ascontiguousarray(array)
    return pb.Tensor(dtype=str(array.dtype), shape=list(array.shape), data=array.tobytes())


def noise(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 8, 8), dtype=np.uint8)


def health(channel: grpc.Channel) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status


def wait_until(predicate, limit_s: float, what: str) -> float:
    """Seconds until ``predicate()`` held (polled every 50 ms); fails after ``limit_s``."""
    began = time.monotonic()
    while not predicate():
        assert time.monotonic() - began < limit_s, f"{what}: not within {limit_s:.0f} s"
        time.sleep(0.05)
    return time.monotonic() - began


def queued_ids(queue_path: Path) -> set[str]:
    """Record ids in the SQLite queue, read with a connection of our own (what a harvester would see)."""
    with sqlite3.connect(queue_path) as db:
        return {row[0] for row in db.execute("SELECT id FROM records")}


def close(a: float, b: float, tol: float = 1e-5) -> bool:
    """Within ``tol``: absolute, or relative where |value| > 1."""
    return abs(a - b) <= tol * max(1.0, abs(a), abs(b))


# -- 1. same answers through both backends -----------------------------------------------------------
def test_embedded_and_triton_backends_give_the_same_answers(start_gateway, triton_server, held_out_digits):
    compare_backends(start_gateway, triton_server, held_out_digits)


def test_a_multi_layer_export_is_served_alike_by_both_backends(start_gateway, triton_install, digits_export_ml,
                                                                 held_out_digits, tmp_path):
    """A version exported with --multi-layer (sisom_ml / sisome_ml outputs, the backward pass in the graph) on a
    tritonserver of its own: the same answers as the embedded backend, every declared score included."""
    import shutil

    from oodguard.triton_local import TritonServer

    repository = tmp_path / "repository"
    shutil.copytree(digits_export_ml[2], repository)
    assert {"sisom_ml", "sisome_ml"} <= set(declared_scores(repository))
    server = TritonServer(triton_install, repository, tmp_path / "tritonserver.log")
    try:
        server.start()
        compare_backends(start_gateway, server, held_out_digits)
    finally:
        server.stop()


def declared_scores(repository: Path, version: int = 1) -> list[str]:
    """The scores the version's calibration.json declares (fused included when it has one)."""
    return list(Calibration.load(repository / MODEL / str(version) / CALIBRATION_FILE).model["scores"])


def compare_backends(start_gateway, triton_server, held_out_digits) -> None:
    """Embedded and Triton gateways on ``triton_server``'s repository answer 40 items alike."""
    repository = triton_server.repository
    scores = declared_scores(repository)
    assert "fused" in scores
    embedded = start_gateway("embedded", repository, backend="embedded")
    triton = start_gateway("triton", repository, backend="triton", triton_url=triton_server.url)
    batch = np.concatenate([held_out_digits[:20], noise(20, seed=11)])
    request = pb.PredictRequest(tensor=tensor(batch), request_id="parity", top_k=8)
    answers = {}
    for name, gw in (("embedded", embedded), ("triton", triton)):
        with grpc.insecure_channel(gw.target) as channel:
            answers[name] = pb_grpc.OODGuardStub(channel).Predict(request, timeout=30)
    e, t = answers["embedded"], answers["triton"]

    assert (e.model, e.version, e.request_id) == (t.model, t.version, t.request_id) == (MODEL, 1, "parity")
    assert len(e.predictions) == len(t.predictions) == len(batch)
    flagged = [p.decision.ood for p in t.predictions]
    assert sum(flagged[:20]) <= 4, "held-out digits should mostly pass (thresholds at 95% TPR)"
    assert sum(flagged[20:]) >= 18, "uniform noise should be flagged"
    mismatches = []
    for i, (a, b) in enumerate(zip(e.predictions, t.predictions)):
        assert (a.model, a.version) == (b.model, b.version) == (MODEL, 1), i
        assert a.decision.ood == b.decision.ood, (i, dict(a.scores), dict(b.scores))
        assert list(a.decision.crossed) == list(b.decision.crossed), i
        assert list(a.decision.deciding_scores) == list(b.decision.deciding_scores) and a.decision.mode == b.decision.mode
        assert dict(a.decision.thresholds) == dict(b.decision.thresholds), i
        assert (a.class_index, a.class_name) == (b.class_index, b.class_name), i
        assert [c.index for c in a.top_k] == [c.index for c in b.top_k], i
        assert a.queue_status == b.queue_status and bool(a.queue_record_id) == bool(b.queue_record_id), i
        assert set(a.scores) == set(b.scores) == set(scores), i  # every score the version declares (fused too)
        assert a.decision.driver == b.decision.driver and a.decision.driver, i
        values = [(f"scores[{k}]", a.scores[k], b.scores[k]) for k in a.scores]
        values += [(f"p_values[{k}]", a.decision.p_values[k], b.decision.p_values[k]) for k in a.decision.p_values]
        values += [("probability", a.probability, b.probability)]
        values += [(f"top_k[{j}]", x.probability, y.probability) for j, (x, y) in enumerate(zip(a.top_k, b.top_k))]
        mismatches += [(i, what, x, y) for what, x, y in values if not close(x, y)]
    assert not mismatches, mismatches[:10]
    worst = max(abs(a.scores[k] - b.scores[k]) / max(1.0, abs(a.scores[k]))
                for a, b in zip(e.predictions, t.predictions) for k in a.scores)
    print(f"40 items: {sum(flagged)} flagged by both; largest score difference {worst:.2e}")


@pytest.mark.parametrize("inflight", [1, 3])
def test_concurrent_requests_merge_into_triton_calls_within_the_inflight_limit(start_gateway, triton_server,
                                                                             held_out_digits, inflight):
    import asyncio

    ensure_running(triton_server)
    gw = start_gateway(f"merge-{inflight}", triton_server.repository, backend="triton", triton_url=triton_server.url,
                       triton_inflight_batches=inflight, max_wait_ms=0.0)
    backend = gw.gateway.backend
    assert gw.gateway.batcher.max_inflight == inflight
    running, peak, real_infer = 0, 0, backend.infer

    async def counted_infer(*args):  # the real Triton call, counted
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        try:
            return await real_infer(*args)
        finally:
            running -= 1

    backend.infer = counted_infer
    requests = [pb.PredictRequest(tensor=tensor(held_out_digits[i:i + 1]), request_id=f"r{i}") for i in range(48)]
    with grpc.insecure_channel(gw.target) as channel:  # the expected answers, one request at a time
        stub = pb_grpc.OODGuardStub(channel)
        alone = [stub.Predict(r, timeout=30) for r in requests]

    async def together():
        async with grpc.aio.insecure_channel(gw.target) as channel:
            stub = pb_grpc.OODGuardStub(channel)
            return await asyncio.gather(*(stub.Predict(r, timeout=30) for r in requests))

    before = len(gw.gateway.batcher.batch_rows)
    merged = asyncio.run(together())
    rows = list(gw.gateway.batcher.batch_rows)[before:]
    assert sum(rows) == 48 and len(rows) < 48 and max(rows) > 1, rows
    assert 1 <= peak <= inflight, (peak, inflight)
    for a, b in zip(alone, merged):  # each request got its own rows of the merged calls
        assert b.request_id == a.request_id
        assert b.predictions[0].class_index == a.predictions[0].class_index
        assert b.predictions[0].decision.ood == a.predictions[0].decision.ood
        assert all(close(a.predictions[0].scores[k], b.predictions[0].scores[k]) for k in a.predictions[0].scores)
    print(f"inflight {inflight}: 48 requests in {len(rows)} Triton calls (rows {rows}), peak {peak} in flight")


# -- 2. a Triton outage through the gateway ----------------------------------------------------------
def test_triton_outage_is_unavailable_and_the_gateway_recovers_without_losing_queued_records(triton_gateway,
                                                                                          triton_server, caplog):
    gw = triton_gateway
    caplog.set_level(logging.INFO, logger="oodguard")
    queue_path = gw.settings.queue_path
    with grpc.insecure_channel(gw.target) as channel:
        stub = pb_grpc.OODGuardStub(channel)
        before = stub.Predict(pb.PredictRequest(tensor=tensor(noise(12, seed=21)), request_id="before"), timeout=30)
        ids_before = {p.queue_record_id for p in before.predictions if p.queue_status == pb.QUEUED}
        assert len(ids_before) >= 10 and queued_ids(queue_path) == ids_before
        assert health(channel) == SERVING

        try:
            triton_server.kill()  # SIGKILL: a crash, as the gateway sees it
            # the registry's poll notices on its own (no request needed)
            to_not_serving = wait_until(lambda: health(channel) == NOT_SERVING, 10, "health NOT_SERVING after the kill")
            with pytest.raises(grpc.RpcError) as down:
                stub.Predict(pb.PredictRequest(tensor=tensor(noise(4, seed=22)), request_id="during"), timeout=10)
            assert down.value.code() == grpc.StatusCode.UNAVAILABLE, down.value.details()
            details = down.value.details()
            assert "backend unavailable" in details and f"Triton at {triton_server.url}" in details, details
            assert "UNAVAILABLE" in details, details  # the transport's status is passed on
            assert any(cause in details for cause in ("failed to connect", "Connection refused", "Socket closed")), details
            assert health(channel) == NOT_SERVING
            assert queued_ids(queue_path) == ids_before  # nothing lost, nothing half-written

            triton_server.restart()  # same ports; the gateway keeps its channel
        finally:
            if triton_server.process is None:  # leave the shared server running for later tests
                triton_server.start()

        def predict_works() -> bool:
            try:
                stub.Predict(pb.PredictRequest(tensor=tensor(noise(1, seed=23))), timeout=5)
                return True
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE, (exc.code(), exc.details())
                return False

        to_predict = wait_until(predict_works, OUTAGE_LIMIT_S, "Predict after the restart")
        to_serving = wait_until(lambda: health(channel) == SERVING, OUTAGE_LIMIT_S, "health SERVING after the restart")
        to_serving += to_predict
        after = stub.Predict(pb.PredictRequest(tensor=tensor(noise(12, seed=24)), request_id="after"), timeout=30)
        assert after.version == 1 and health(channel) == SERVING
        ids_after = {p.queue_record_id for p in after.predictions if p.queue_status == pb.QUEUED}
        assert len(ids_after) >= 10 and not ids_after & ids_before

    # every record queued before the outage is still there after it (read with a connection of our own)
    with sqlite3.connect(queue_path) as db:
        rows = dict(db.execute("SELECT r.id, q.request_id FROM records r JOIN requests q ON q.ref = r.request_ref"))
    assert ids_before | ids_after <= set(rows)
    assert {rows[i] for i in ids_before} == {"before"} and "during" not in rows.values()
    records = gw.gateway.queue.get(sorted(ids_before))
    assert len(records) == len(ids_before) and all(r.flagged and r.model == MODEL for r in records)
    logged = [r.getMessage() for r in caplog.records if r.name.startswith("oodguard")]
    assert any(m.startswith("health: NOT_SERVING (") and f"Triton at {triton_server.url}" in m for m in logged), logged
    assert any(m == "health: SERVING" for m in logged), logged
    print(f"kill → NOT_SERVING in {to_not_serving:.2f} s (by the poll alone); "
          f"tritonserver restart took {triton_server.started_in_s:.2f} s; after it was ready: Predict OK in "
          f"{to_predict:.2f} s, SERVING in {to_serving:.2f} s")


def test_unavailable_predict_flips_health_before_the_poll_does(start_gateway, triton_server):
    """A Predict that finds Triton gone flips health at once (the poll here is slow), and health comes back."""
    gw = start_gateway("slow-poll", triton_server.repository, backend="triton", triton_url=triton_server.url,
                       poll_interval_s=30.0)
    with grpc.insecure_channel(gw.target) as channel:
        stub = pb_grpc.OODGuardStub(channel)
        request = pb.PredictRequest(tensor=tensor(noise(2, seed=31)))
        assert stub.Predict(request, timeout=30).version == 1 and health(channel) == SERVING
        try:
            triton_server.kill()
            with pytest.raises(grpc.RpcError) as down:
                stub.Predict(request, timeout=10)
            assert down.value.code() == grpc.StatusCode.UNAVAILABLE and "Triton at" in down.value.details()
            assert health(channel) == NOT_SERVING  # at once: no poll ran in between
            triton_server.restart()
        finally:
            if triton_server.process is None:
                triton_server.start()

        def predict_works() -> bool:
            try:
                return stub.Predict(request, timeout=5).version == 1
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE, (exc.code(), exc.details())
                return False

        wait_until(predict_works, OUTAGE_LIMIT_S, "Predict after the restart")
        assert health(channel) == SERVING  # the successful call restored it, without waiting for the poll


def test_orderly_triton_stop_is_only_ever_unavailable(triton_gateway, triton_server):
    """SIGTERM (a rolling restart): while Triton drains and unloads the model, and after it exits, every failed
    Predict is UNAVAILABLE (never "unknown model" / INVALID_ARGUMENT), health goes NOT_SERVING, and it recovers."""
    gw = triton_gateway
    with grpc.insecure_channel(gw.target) as channel:
        stub = pb_grpc.OODGuardStub(channel)
        request = pb.PredictRequest(tensor=tensor(noise(2, seed=51)))
        assert stub.Predict(request, timeout=30).version == 1
        outcomes: list[tuple[str, str]] = []
        try:
            os.killpg(triton_server.process.pid, signal.SIGTERM)
            began = time.monotonic()
            while triton_server.process.poll() is None and time.monotonic() - began < 15:
                try:
                    stub.Predict(request, timeout=5)
                    outcomes.append(("OK", ""))
                except grpc.RpcError as exc:
                    outcomes.append((exc.code().name, exc.details()))
                time.sleep(0.02)
            with pytest.raises(grpc.RpcError) as gone:
                stub.Predict(request, timeout=5)
            outcomes.append((gone.value.code().name, gone.value.details()))
            wait_until(lambda: health(channel) == NOT_SERVING, 10, "health NOT_SERVING after the stop")
            triton_server.stop()  # reap it (SIGKILL if it is still draining)
            triton_server.start()
        finally:
            if triton_server.process is None:
                triton_server.start()
        wait_until(lambda: health(channel) == SERVING, OUTAGE_LIMIT_S, "health SERVING after the restart")
        assert stub.Predict(request, timeout=30).version == 1
    failures = [(code, details) for code, details in outcomes if code != "OK"]
    assert failures and all(code == "UNAVAILABLE" for code, _ in failures), sorted(set(failures))
    assert all(details.startswith("backend unavailable: Triton at") for _, details in failures), sorted(set(failures))
    kinds = sorted({details.split(": ", 3)[-1][:50] for _, details in failures})
    print(f"during/after SIGTERM: {len(outcomes)} calls, {len(failures)} UNAVAILABLE; causes: {kinds}")


# -- 3. deadline propagation -------------------------------------------------------------------------
def test_short_deadline_is_deadline_exceeded_and_the_next_call_succeeds(triton_gateway, triton_server, held_out_digits,
                                                                        caplog):
    gw = triton_gateway
    caplog.set_level(logging.INFO, logger="oodguard")
    batch = pb.PredictRequest(tensor=tensor(np.concatenate([held_out_digits[:32], noise(32, seed=41)])))
    with grpc.insecure_channel(gw.target) as channel:
        stub = pb_grpc.OODGuardStub(channel)
        assert len(stub.Predict(batch, timeout=30).predictions) == 64  # connected and warm
        with pytest.raises(grpc.RpcError) as short:
            stub.Predict(batch, timeout=0.001)
        assert short.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, short.value.details()
        assert len(stub.Predict(batch, timeout=30).predictions) == 64

        # deadlines around one inference's time: each call either answers or is DEADLINE_EXCEEDED, never
        # anything else, and a request that ran out of time must not mark the backend as down
        codes = []
        for timeout in (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2) * 3:
            try:
                stub.Predict(batch, timeout=timeout)
                codes.append("OK")
            except grpc.RpcError as exc:
                codes.append(exc.code().name)
        assert set(codes) <= {"OK", "DEADLINE_EXCEEDED"}, codes
        assert health(channel) == SERVING
        after = stub.Predict(batch, timeout=30)
        assert len(after.predictions) == 64 and after.version == 1
    assert triton_server.process.poll() is None  # the server did not fall over either
    problems = [r.getMessage() for r in caplog.records
                if r.name.startswith("oodguard") and (r.levelno >= logging.WARNING or "NOT_SERVING" in r.getMessage())]
    assert not problems, problems
    print(f"deadline sweep: {codes}")


def test_a_paused_triton_answers_a_call_without_deadline_within_the_backend_timeout(start_gateway, triton_server,
                                                                                      held_out_digits):
    """tritonserver stopped with SIGSTOP (paused, its port still open): a call that sets no deadline is answered
    DEADLINE_EXCEEDED once --backend-timeout-s passes, instead of hanging as long as the pause; after SIGCONT the
    same gateway answers again."""
    import signal

    ensure_running(triton_server)
    gw = start_gateway("triton", triton_server.repository, backend="triton", triton_url=triton_server.url,
                       backend_timeout_s=2.0)
    request = pb.PredictRequest(tensor=tensor(held_out_digits[:4]))
    with grpc.insecure_channel(gw.target) as channel:
        stub = pb_grpc.OODGuardStub(channel)
        assert len(stub.Predict(request, timeout=30).predictions) == 4
        health = health_pb2_grpc.HealthStub(channel)
        triton_server._signal(signal.SIGSTOP)
        with ThreadPoolExecutor(1) as pool:
            def no_deadline():
                try:
                    stub.Predict(request)  # no client deadline at all
                    return grpc.StatusCode.OK
                except grpc.RpcError as exc:
                    return exc.code()

            try:
                # three calls in a row time out (before the fix the first had no answer until the server
                # resumed): then health says NOT_SERVING, so load balancers stop sending
                codes = [pool.submit(no_deadline).result(timeout=60) for _ in range(3)]
                status = health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
            finally:
                triton_server._signal(signal.SIGCONT)
        assert codes == [grpc.StatusCode.DEADLINE_EXCEEDED] * 3
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        deadline = time.monotonic() + 60
        while True:  # the resumed server answers again through the same gateway
            try:
                assert len(stub.Predict(request, timeout=10).predictions) == 4
                if health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == \
                        health_pb2.HealthCheckResponse.SERVING:
                    break
            except grpc.RpcError as exc:
                assert exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
                assert time.monotonic() < deadline, triton_server.log_tail()
                time.sleep(0.5)
