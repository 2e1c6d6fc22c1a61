"""The Python SDK against a real gateway on 127.0.0.1: inputs (numpy, PIL, paths, bytes), typed results,
deadlines, retries on UNAVAILABLE (and never on INVALID_ARGUMENT), bearer metadata, the asyncio client."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import threading
import time

import grpc
import numpy as np
import pytest
from PIL import Image

from oodguard.clients.sdk import (AsyncOODGuardClient, Decision, OODGuardClient, OODGuardError, Prediction,
                                  RetryPolicy, build_request)
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
    assert p.decision.deciding == ("sisome",) and p.decision.mode == "any"
    assert set(p.decision.thresholds) == set(p.scores) == set(p.decision.p_values) and "sisome" in p.scores
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.class_index = 3  # type: ignore[misc]
    flagged = client.predict(noise(8))
    assert sum(f.ood for f in flagged) >= 7
    for f in flagged:
        if f.ood:
            assert f.record_id and f.queue_status == "QUEUED" and "sisome" in f.decision.crossed
            assert f.decision.deciding_crossed == ("sisome",)
            assert f.scores["sisome"] > f.decision.thresholds["sisome"]
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
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and "cannot decode" in info.value.details
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
