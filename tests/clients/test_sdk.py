"""The Python SDK against a real gateway on 127.0.0.1: inputs (numpy, PIL, paths, bytes), typed results,
deadlines, retries on UNAVAILABLE (and never on INVALID_ARGUMENT), bearer metadata, the asyncio client; and
against a scripted gRPC server in this process: retries on an overloaded RESOURCE_EXHAUSTED, never on one for a
message above a size limit."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import random
import threading
import time
from concurrent import futures

import grpc
import numpy as np
import pytest
from PIL import Image

from oodguard.clients.sdk import (NO_RETRY, AsyncOODGuardClient, Decision, OODGuardClient, OODGuardError,
                                  Prediction, RetryPolicy, build_request)
from oodguard.serve.v1 import oodguard_pb2 as pb
from oodguard.serve.v1 import oodguard_pb2_grpc as pb_grpc
from oodguard.preprocess import Preprocessing
from oodguard.calibration import Calibration

from .conftest import free_port


def noise(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 28, 28), dtype=np.uint8)


@pytest.fixture
def gateway(start_gateway, repo_copy):
    return start_gateway(repo_copy)


@pytest.fixture
def client(gateway):
    with OODGuardClient(gateway.target, timeout=10) as client:
        yield client


def test_numpy_pil_path_and_bytes_inputs_agree(client, gateway, digits_test_images, tmp_path):
    images = digits_test_images[0][:3]
    cal = Calibration.load(gateway.settings.repository / "digits" / "1" / "calibration.json")
    x = Preprocessing.from_dict(cal.model["preprocessing"]).apply(images)
    paths = []
    for i, image in enumerate(images):
        paths.append(tmp_path / f"digit{i}.png")
        Image.fromarray(image).save(paths[-1])
    as_uint8 = client.predict(images)
    as_float = client.predict(x)
    as_pil = client.predict([Image.fromarray(i) for i in images])
    as_paths = client.predict(paths)
    as_str_paths = client.predict([str(p) for p in paths])
    as_bytes = client.predict([p.read_bytes() for p in paths])
    as_list = client.predict(list(images))  # one item per array
    single = client.predict_one(images[0])
    assert single == dataclasses.replace(as_uint8[0], request_id=single.request_id, record_id=single.record_id)
    for group in zip(as_uint8, as_float, as_pil, as_paths, as_str_paths, as_bytes, as_list):
        assert len({p.class_index for p in group}) == 1
        assert max(p.scores["sisome"] for p in group) - min(p.scores["sisome"] for p in group) < 1e-4
    assert client.predict_one(paths[1]).class_index == as_uint8[1].class_index
    assert client.predict_one(Image.fromarray(images[2])).class_index == as_uint8[2].class_index


def test_typed_results(client, gateway, digits_test_images):
    images, labels = digits_test_images
    predictions = client.predict(images[:32], top_k=4, request_id="typed-1", metadata={"who": "sdk-test"})
    assert len(predictions) == 32 and all(isinstance(p, Prediction) for p in predictions)
    assert np.mean([p.class_index for p in predictions] == labels[:32]) > 0.85
    p = predictions[0]
    assert isinstance(p.decision, Decision) and p.model == "digits" and p.version == 1 and p.request_id == "typed-1"
    assert len(p.top_k) == 4 and p.top_k[0].index == p.class_index and p.top_k[0].probability == pytest.approx(p.probability)
    assert p.class_name == p.top_k[0].name and 0 < p.probability <= 1
    assert p.decision.deciding == ("fused",) and p.decision.mode == "any"
    assert set(p.decision.thresholds) == set(p.scores) == set(p.decision.p_values) and "fused" in p.scores
    cal = Calibration.load(gateway.settings.repository / "digits" / "1" / "calibration.json")
    components = [c for c in p.scores if c in cal.model["score_params"]["fused"]["components"]]
    assert len(components) == 3  # the driver is one of the fused score's components, the least likely in-distribution
    assert p.decision.driver == min(components, key=lambda c: (p.decision.p_values[c], components.index(c)))
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.class_index = 3  # type: ignore[misc]
    flagged = client.predict(noise(8))
    assert sum(f.ood for f in flagged) >= 7
    for f in flagged:
        if f.ood:
            assert f.record_id and f.queue_status == "QUEUED" and "fused" in f.decision.crossed
            assert f.decision.deciding_crossed == ("fused",) and f.decision.reasons == ("threshold",)
            assert f.scores["fused"] > f.decision.thresholds["fused"] and f.decision.driver
        else:
            assert not f.record_id and f.queue_status == "NOT_QUEUED"
    as_dict = flagged[0].to_dict()
    assert as_dict["decision"]["ood"] == flagged[0].ood and isinstance(as_dict["scores"], dict)
    info = client.model_info()
    assert info.models[0].name == "digits" and info.backend == "embedded"


def test_invalid_argument_is_not_retried(gateway):
    retries = []
    with OODGuardClient(gateway.target, timeout=10, retry=RetryPolicy(max_attempts=5, initial_backoff_s=0.5),
                        on_retry=lambda *a: retries.append(a)) as client:
        started = time.monotonic()
        with pytest.raises(OODGuardError) as info:
            client.predict(b"not an image")
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and "not a PNG or JPEG" in info.value.details
        assert info.value.attempts == 1 and not retries and time.monotonic() - started < 0.5
        with pytest.raises(OODGuardError) as info:
            client.predict(np.zeros((1, 1, 8, 8), np.float32))  # float32 of the wrong shape
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and info.value.attempts == 1
        with pytest.raises(OODGuardError) as info:
            client.predict(noise(1), model="nope")
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and not retries


def test_retries_unavailable_until_the_gateway_starts(start_gateway, repo_copy):
    port = free_port()
    retries = []
    later = threading.Timer(0.8, lambda: start_gateway(repo_copy, listen=f"127.0.0.1:{port}"))
    later.start()
    try:
        with OODGuardClient(f"127.0.0.1:{port}", timeout=20, on_retry=lambda *a: retries.append(a),
                            retry=RetryPolicy(max_attempts=30, initial_backoff_s=0.1, max_backoff_s=0.4)) as client:
            prediction = client.predict_one(noise(1)[0])
    finally:
        later.join()
    assert prediction.model == "digits"
    assert retries and all(error.code() == grpc.StatusCode.UNAVAILABLE for _, error, _ in retries)
    assert all(0 <= delay <= 0.4 for _, _, delay in retries)


def test_gives_up_after_bounded_attempts():
    retries = []
    with OODGuardClient(f"127.0.0.1:{free_port()}", timeout=10, on_retry=lambda *a: retries.append(a),
                        retry=RetryPolicy(max_attempts=3, initial_backoff_s=0.05)) as client:
        with pytest.raises(OODGuardError) as info:
            client.predict(noise(1))
    assert info.value.code == grpc.StatusCode.UNAVAILABLE and info.value.attempts == 3 and len(retries) == 2


def test_deadline_bounds_the_retries():
    with OODGuardClient(f"127.0.0.1:{free_port()}", timeout=0.6,
                        retry=RetryPolicy(max_attempts=100, initial_backoff_s=0.1, max_backoff_s=0.2)) as client:
        started = time.monotonic()
        with pytest.raises(OODGuardError) as info:
            client.predict(noise(1))
    assert time.monotonic() - started < 1.5
    assert info.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def test_bearer_token_is_sent_as_metadata(gateway):
    """Server-side auth is another component; the client must send ``authorization: Bearer <token>``."""
    seen = []

    class Capture(grpc.UnaryUnaryClientInterceptor):
        def intercept_unary_unary(self, continuation, details, request):
            seen.append(dict(details.metadata or ()))
            return continuation(details, request)

    with OODGuardClient(gateway.target, token="s3cret") as client:
        client.channel = grpc.intercept_channel(client.channel, Capture())
        from oodguard.serve.v1 import oodguard_pb2_grpc as pb_grpc

        client.stub = pb_grpc.OODGuardStub(client.channel)
        client.predict(noise(1))
    assert seen and seen[0]["authorization"] == "Bearer s3cret"


def test_request_building_rejects_bad_inputs():
    with pytest.raises(ValueError):
        build_request(np.zeros((2, 2, 2, 2, 2), np.uint8))
    with pytest.raises(ValueError):
        build_request(np.zeros((1, 8, 8), np.int32))
    with pytest.raises(FileNotFoundError):
        build_request("/nonexistent/image.png")
    with pytest.raises(TypeError):
        build_request(object())
    with pytest.raises(ValueError):
        RetryPolicy(retry_on=frozenset({grpc.StatusCode.INVALID_ARGUMENT}))
    request = build_request([np.zeros((8, 8), np.uint8), np.zeros((4, 4, 3), np.uint8)])  # sizes differ: PNG
    assert request.WhichOneof("input") == "images" and len(request.images.images) == 2
    assert Image.open(io.BytesIO(request.images.images[1])).size == (4, 4)


def test_async_client(gateway, digits_test_images):
    images = digits_test_images[0][:4]

    async def main():
        async with AsyncOODGuardClient(gateway.target, timeout=10) as client:
            results = await asyncio.gather(*(client.predict_one(image) for image in images), client.predict(noise(4)))
            with pytest.raises(OODGuardError) as info:
                await client.predict(b"garbage")
            assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and info.value.attempts == 1
            return results

    *singles, flagged = asyncio.run(main())
    assert all(isinstance(p, Prediction) for p in singles) and sum(p.ood for p in flagged) >= 3


def test_async_client_retries_unavailable(start_gateway, repo_copy):
    port = free_port()
    later = threading.Timer(0.8, lambda: start_gateway(repo_copy, listen=f"127.0.0.1:{port}"))
    retries = []

    async def main():
        async with AsyncOODGuardClient(f"127.0.0.1:{port}", timeout=20, on_retry=lambda *a: retries.append(a),
                                       retry=RetryPolicy(max_attempts=30, max_backoff_s=0.4)) as client:
            return await client.predict_one(noise(1)[0])

    later.start()
    try:
        prediction = asyncio.run(main())
    finally:
        later.join()
    assert prediction.ood and retries


# -- RESOURCE_EXHAUSTED: overloaded (retried) or a size limit (never), against a scripted server -------------
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
OVERLOADED = "overloaded: 257 requests in flight, limit 256 (call {call})"
TOO_LARGE = "reply would be 20000000 bytes, above the max message size of 16777216 bytes (call {call})"


class Scripted(pb_grpc.OODGuardServicer):
    """``Predict`` answers ``code`` with ``details`` (``{call}``: the call's number, from 1) for the first
    ``failures`` calls, then OK with one prediction (its class name ``reply_padding`` characters long)."""

    def __init__(self, failures: int, details: str = OVERLOADED, code: grpc.StatusCode = EXHAUSTED,
                 reply_padding: int = 3):
        self.failures, self.details, self.code, self.reply_padding = failures, details, code, reply_padding
        self.calls = 0
        self.lock = threading.Lock()

    def Predict(self, request, context):
        with self.lock:
            self.calls += 1
            call = self.calls
        if call <= self.failures:
            context.abort(self.code, self.details.format(call=call))
        return pb.PredictResponse(model="scripted", version=1, request_id=request.request_id, predictions=[
            pb.Prediction(class_index=1, class_name="x" * self.reply_padding, probability=0.9, model="scripted",
                          version=1)])


def in_process_server(servicer: pb_grpc.OODGuardServicer) -> tuple[grpc.Server, str]:
    """``servicer`` served on a free loopback port by a gRPC server in this process: (server, target)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_OODGuardServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


@pytest.fixture
def scripted():
    """``scripted(failures, details=OVERLOADED, ...)``: a :class:`Scripted` servicer served here and its target."""
    servers = []

    def start(failures: int, details: str = OVERLOADED, **kwargs) -> tuple[Scripted, str]:
        servicer = Scripted(failures, details, **kwargs)
        server, target = in_process_server(servicer)
        servers.append(server)
        return servicer, target

    yield start
    for server in servers:
        server.stop(0)


def expected_sleeps(policy: RetryPolicy, seed: int, retries: int) -> list[float]:
    """The client's backoffs with ``seed``: one draw of its rng per failed attempt."""
    rng = random.Random(seed)
    return [policy.backoff(n, rng) for n in range(1, retries + 1)]


def test_which_resource_exhausted_is_retried():
    policy = RetryPolicy()
    assert policy.retries(EXHAUSTED, "overloaded: 9000 items in flight, limit 8192")
    assert policy.retries(grpc.StatusCode.UNAVAILABLE, "") and policy.retries(grpc.StatusCode.UNAVAILABLE, None)
    for details in ("Received message larger than max (20000000 vs. 16777216)",
                    "Sent message larger than max (20000000 vs. 16777216)", TOO_LARGE, "", None,
                    "server overloaded: prefix only"):
        assert not policy.retries(EXHAUSTED, details), details
    assert not policy.retries(grpc.StatusCode.INTERNAL, "overloaded: not this status")
    assert not RetryPolicy(retry_on=frozenset({grpc.StatusCode.UNAVAILABLE})).retries(EXHAUSTED, "overloaded: x")
    every = RetryPolicy(retry_details_prefixes={EXHAUSTED: ("",)})
    assert every.retries(EXHAUSTED, TOO_LARGE) and every.retries(EXHAUSTED, None)
    assert not RetryPolicy(retry_details_prefixes={EXHAUSTED: ()}).retries(EXHAUSTED, "overloaded: x")
    assert RetryPolicy(retry_details_prefixes={}) == policy
    # another status narrowed by its details, the default's RESOURCE_EXHAUSTED rule kept; a str is one prefix
    narrowed = RetryPolicy(retry_details_prefixes={grpc.StatusCode.UNAVAILABLE: "backend"})
    assert narrowed.retries(grpc.StatusCode.UNAVAILABLE, "backend unavailable: down")
    assert not narrowed.retries(grpc.StatusCode.UNAVAILABLE, "b") and not narrowed.retries(EXHAUSTED, TOO_LARGE)
    assert narrowed.retries(EXHAUSTED, "overloaded: x")
    assert narrowed == RetryPolicy(retry_details_prefixes={grpc.StatusCode.UNAVAILABLE: ("backend",)})
    assert hash(narrowed) == hash(RetryPolicy())  # still hashable (the prefixes are left out of the hash)
    with pytest.raises(TypeError):
        RetryPolicy(retry_details_prefixes={"RESOURCE_EXHAUSTED": ("overloaded:",)})
    with pytest.raises(TypeError):
        RetryPolicy(retry_details_prefixes={EXHAUSTED: (b"overloaded:",)})


def test_retries_overloaded_until_it_succeeds(scripted):
    servicer, target = scripted(3)
    policy = RetryPolicy(max_attempts=5, initial_backoff_s=0.05, max_backoff_s=0.15)
    retries = []
    with OODGuardClient(target, timeout=10, retry=policy, seed=7, on_retry=lambda *a: retries.append(a)) as client:
        started = time.monotonic()
        prediction = client.predict_one(noise(1)[0])
        elapsed = time.monotonic() - started
    assert prediction.model == "scripted" and prediction.class_index == 1
    assert servicer.calls == 4  # 3 overloaded, then OK on attempt 4
    assert [attempt for attempt, _, _ in retries] == [1, 2, 3]
    assert all(e.code() == EXHAUSTED and e.details() == OVERLOADED.format(call=n) for n, e, _ in retries)
    sleeps = [delay for _, _, delay in retries]
    assert sleeps == expected_sleeps(policy, 7, 3)  # full jitter: uniform(0, min(max, initial * 2**(n-1)))
    assert all(0 <= s <= cap for s, cap in zip(sleeps, (0.05, 0.1, 0.15)))
    assert elapsed >= sum(sleeps)  # and they were slept


def test_overloaded_gives_up_at_max_attempts_with_the_last_error(scripted):
    servicer, target = scripted(10**6)
    retries = []
    with OODGuardClient(target, timeout=10, retry=RetryPolicy(max_attempts=3, initial_backoff_s=0.01),
                        on_retry=lambda *a: retries.append(a)) as client:
        with pytest.raises(OODGuardError) as info:
            client.predict(noise(1))
    assert info.value.code == EXHAUSTED and info.value.attempts == 3 and servicer.calls == 3
    assert info.value.details == OVERLOADED.format(call=3) and "after 3 attempts" in str(info.value)
    assert [attempt for attempt, _, _ in retries] == [1, 2]


def test_size_limits_are_never_retried(scripted):
    retries = []
    policy = RetryPolicy(max_attempts=5, initial_backoff_s=0.5)

    def client(target: str, **kwargs) -> OODGuardClient:
        return OODGuardClient(target, timeout=10, retry=policy, on_retry=lambda *a: retries.append(a), **kwargs)

    # the gateway's own limit on the reply
    servicer, target = scripted(10**6, TOO_LARGE)
    with client(target) as c:
        with pytest.raises(OODGuardError) as info:
            c.predict(noise(1))
    assert info.value.code == EXHAUSTED and info.value.details == TOO_LARGE.format(call=1)
    assert info.value.attempts == 1 and servicer.calls == 1
    # gRPC's: a reply above the client's max message size (the server answered once), a request above it (never sent)
    servicer, target = scripted(0, reply_padding=8192)
    with client(target, max_message_bytes=4096) as c:
        with pytest.raises(OODGuardError) as info:
            c.predict(noise(1))
        assert info.value.code == EXHAUSTED and "Received message larger than max" in info.value.details
        assert info.value.attempts == 1 and servicer.calls == 1
        with pytest.raises(OODGuardError) as info:
            c.predict(noise(8))  # 8 x 28 x 28 bytes of pixels
        assert info.value.code == EXHAUSTED and "Sent message larger than max" in info.value.details
        assert info.value.attempts == 1 and servicer.calls == 1
    assert not retries


def test_overloaded_retries_stop_at_the_deadline(scripted):
    servicer, target = scripted(10**6)
    retries = []
    with OODGuardClient(target, timeout=0.5, on_retry=lambda *a: retries.append(a),
                        retry=RetryPolicy(max_attempts=1000, initial_backoff_s=0.02, max_backoff_s=0.1)) as client:
        started = time.monotonic()
        with pytest.raises(OODGuardError) as info:
            client.predict(noise(1))
        elapsed = time.monotonic() - started
    assert elapsed < 0.5 + 0.3  # the deadline, plus one answer's time at most
    assert info.value.code in (EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED)
    assert 3 <= len(retries) < 1000 and sum(delay for _, _, delay in retries) < 0.5
    assert servicer.calls == len(retries) + 1


def test_no_retry_policy_does_not_retry_overloaded(scripted):
    servicer, target = scripted(1)
    with OODGuardClient(target, timeout=10, retry=NO_RETRY) as client:
        with pytest.raises(OODGuardError) as info:
            client.predict(noise(1))
        assert info.value.code == EXHAUSTED and info.value.attempts == 1 and servicer.calls == 1
        assert client.predict(noise(1))[0].model == "scripted"


def test_async_client_retries_overloaded_not_size_limits(scripted):
    overloaded, overloaded_target = scripted(2)
    too_large, too_large_target = scripted(10**6, TOO_LARGE)
    policy = RetryPolicy(max_attempts=4, initial_backoff_s=0.05)
    retries = []

    async def main():
        async with AsyncOODGuardClient(overloaded_target, timeout=10, retry=policy, seed=3,
                                       on_retry=lambda *a: retries.append(a)) as client:
            prediction = await client.predict_one(noise(1)[0])
        async with AsyncOODGuardClient(too_large_target, timeout=10, retry=policy,
                                       on_retry=lambda *a: retries.append(a)) as client:
            with pytest.raises(OODGuardError) as info:
                await client.predict(noise(1))
        return prediction, info.value

    prediction, error = asyncio.run(main())
    assert prediction.model == "scripted" and overloaded.calls == 3
    assert [attempt for attempt, _, _ in retries] == [1, 2]  # the size error added none
    assert [delay for _, _, delay in retries] == expected_sleeps(policy, 3, 2)
    assert all(e.code() == EXHAUSTED and e.details().startswith("overloaded:") for _, e, _ in retries)
    assert error.code == EXHAUSTED and error.attempts == 1 and too_large.calls == 1
