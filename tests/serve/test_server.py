"""The gateway over real gRPC on 127.0.0.1: Predict, ModelInfo, health, reflection, errors, failure, queue."""

from __future__ import annotations

import asyncio
import io
import json
import sqlite3
import threading
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image

from oodguard.calibration import Calibration
from oodguard.onnx_runner import OnnxModel
from oodguard.preprocess import Preprocessing
from oodguard.serve.backend import Backend, BackendUnavailable, DeadlineExceeded
from oodguard.serve.embedded import EmbeddedBackend
from oodguard.queues.codec import unpack_array
from oodguard.serve.v1 import oodguard_pb2 as pb
from oodguard.serve.v1 import oodguard_pb2_grpc as pb_grpc

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def tensor(array: np.ndarray, dtype: str | None = None) -> pb.Tensor:
    array = np.ascontiguousarray(array)
    return pb.Tensor(dtype=dtype or str(array.dtype), shape=list(array.shape), data=array.tobytes())


def noise(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 28, 28), dtype=np.uint8)


def png(image: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture
def gateway(start_gateway, repo_copy):
    return start_gateway(repo_copy, max_message_bytes=1024 * 1024)


@pytest.fixture
def stub(gateway):
    with grpc.insecure_channel(gateway.target) as channel:
        yield pb_grpc.OODGuardStub(channel)


def calibration_of(repository) -> Calibration:
    return Calibration.load(repository / "digits" / "1" / "calibration.json")


def test_predict_in_distribution_digits(gateway, stub, digits_test_images):
    images, labels = digits_test_images
    repository = gateway.settings.repository
    cal = calibration_of(repository)
    x = Preprocessing.from_dict(cal.model["preprocessing"]).apply(images)
    direct = OnnxModel(repository / "digits" / "1" / "model.onnx").run(x)
    predictions = []
    for start in range(0, len(images), 64):
        response = stub.Predict(pb.PredictRequest(tensor=tensor(images[start:start + 64]), request_id=f"id-{start}",
                                                  top_k=5), timeout=10)
        assert (response.model, response.version, response.request_id) == ("digits", 1, f"id-{start}")
        predictions.extend(response.predictions)
    assert len(predictions) == len(images)
    classes = np.array([p.class_index for p in predictions])
    assert np.mean(classes == labels) > 0.9
    flagged = np.array([p.decision.ood for p in predictions])
    assert flagged.mean() < 0.15  # thresholds at 95% TPR
    for name in ("sisome", "fused"):
        np.testing.assert_allclose([p.scores[name] for p in predictions], direct[name], rtol=1e-4, atol=1e-4)
    # the default decision is fused; each verdict is explained by the component with the smallest p-value
    np.testing.assert_array_equal(flagged, direct["fused"] > cal.thresholds["fused"].threshold)
    components = cal.model["score_params"]["fused"]["components"]
    for p in predictions:
        assert list(p.decision.deciding_scores) == ["fused"]
        assert p.decision.driver == min(components, key=lambda c: (p.decision.p_values[c], components.index(c)))
    first = predictions[0]
    assert set(first.scores) == set(cal.model["scores"])
    assert [c.index for c in first.top_k][0] == first.class_index and len(first.top_k) == 5
    probs = [c.probability for c in first.top_k]
    assert probs == sorted(probs, reverse=True) and first.probability == pytest.approx(probs[0])
    assert first.class_name == cal.class_names[first.class_index]
    for name in ("sisome", "fused"):
        assert first.decision.thresholds[name] == pytest.approx(cal.thresholds[name].threshold)
        assert first.decision.p_values[name] == pytest.approx(
            float(cal.thresholds[name].p_values(first.scores[name])), rel=1e-3)
    assert list(first.decision.deciding_scores) == ["fused"] and first.decision.mode == "any"
    assert all(p.queue_status == pb.QUEUED for p in predictions if p.decision.ood)
    assert all(p.queue_status == pb.NOT_QUEUED and not p.queue_record_id for p in predictions if not p.decision.ood)


def test_float32_png_and_jpeg_inputs_agree_with_uint8(gateway, stub, digits_test_images):
    images = digits_test_images[0][:4]
    cal = calibration_of(gateway.settings.repository)
    x = Preprocessing.from_dict(cal.model["preprocessing"]).apply(images)
    as_uint8 = stub.Predict(pb.PredictRequest(tensor=tensor(images)), timeout=10).predictions
    as_float = stub.Predict(pb.PredictRequest(tensor=tensor(x), model="digits", version=1), timeout=10).predictions
    as_png = stub.Predict(pb.PredictRequest(images=pb.EncodedImages(images=[png(i) for i in images])), timeout=10).predictions
    big_rgb = [np.repeat(np.kron(i, np.ones((4, 4), np.uint8))[..., None], 3, axis=2) for i in images]  # 32x32 RGB
    as_jpeg = stub.Predict(pb.PredictRequest(images=pb.EncodedImages(images=[png(i, "JPEG") for i in big_rgb])),
                           timeout=10).predictions
    rgb_tensor = stub.Predict(pb.PredictRequest(tensor=tensor(np.stack(big_rgb))), timeout=10).predictions
    for a, b, c, j, r in zip(as_uint8, as_float, as_png, as_jpeg, rgb_tensor):
        assert a.class_index == b.class_index == c.class_index == j.class_index == r.class_index
        assert a.scores["sisome"] == pytest.approx(b.scores["sisome"], abs=1e-4)
        assert a.scores["sisome"] == pytest.approx(c.scores["sisome"], abs=1e-4)


def test_noise_is_flagged_and_queued_durably(gateway, stub):
    x = noise(16)
    response = stub.Predict(pb.PredictRequest(tensor=tensor(x), request_id="noise-1",
                                              metadata={"camera": "north", "site": "7"}), timeout=10)
    flagged = [p for p in response.predictions if p.decision.ood]
    assert len(flagged) >= 14
    ids = [p.queue_record_id for p in flagged]
    assert all(p.queue_status == pb.QUEUED for p in flagged) and len(set(ids)) == len(ids) and all(ids)
    # the records are in the SQLite file before Predict returned (read with a separate connection)
    with sqlite3.connect(gateway.settings.queue_path) as db:
        rows = {r[0]: r[1:] for r in db.execute(
            f"SELECT r.id, q.request_id, q.metadata, r.flagged, r.model, r.version, r.input, r.scores, r.decision "
            f"FROM records r JOIN requests q ON q.ref = r.request_ref WHERE r.id IN ({','.join('?' * len(ids))})", ids)}
    assert set(rows) == set(ids)
    index = {p.queue_record_id: i for i, p in enumerate(response.predictions)}
    prep = Preprocessing.from_dict(calibration_of(gateway.settings.repository).model["preprocessing"])
    for rid, (request_id, metadata, was_flagged, model, version, blob, scores, decision) in rows.items():
        item = response.predictions[index[rid]]
        assert (request_id, json.loads(metadata), was_flagged, model, version) == (
            "noise-1", {"camera": "north", "site": "7"}, 1, "digits", 1)
        np.testing.assert_allclose(unpack_array(blob), prep.apply(x[index[rid]][None])[0], atol=1e-6)
        assert json.loads(scores)["sisome"] == pytest.approx(item.scores["sisome"])
        assert json.loads(decision)["ood"] is True
    assert gateway.gateway.queue.stats().flagged == len(ids)
    with sqlite3.connect(gateway.settings.queue_path) as db:  # the request's id and metadata: stored once
        assert db.execute("SELECT COUNT(*) FROM requests").fetchone()[0] == 1



def test_a_retried_request_is_queued_once(gateway, stub):
    # the first answer was lost (say the gateway died after queueing): the client sends the call again
    request = pb.PredictRequest(tensor=tensor(noise(6, seed=5)), request_id="retry-1", metadata={"camera": "east"})
    first = stub.Predict(request, timeout=10).predictions
    again = stub.Predict(request, timeout=10).predictions
    ids = [p.queue_record_id for p in first]
    assert sum(map(bool, ids)) >= 4 and [p.queue_record_id for p in again] == ids
    assert [p.queue_status for p in again] == [p.queue_status for p in first]
    queued = [i for i in ids if i]
    with sqlite3.connect(gateway.settings.queue_path) as db:  # one record per item
        assert sorted(rid for (rid,) in db.execute("SELECT id FROM records")) == sorted(queued)
    # another request id is another request: queued again
    other = stub.Predict(pb.PredictRequest(tensor=request.tensor, request_id="retry-2"), timeout=10).predictions
    assert set(p.queue_record_id for p in other if p.queue_record_id).isdisjoint(queued)
    assert gateway.gateway.queue.stats().size == 2 * len(queued)

BAD_REQUESTS = [
    (pb.PredictRequest(), "no input"),
    (pb.PredictRequest(tensor=tensor(np.zeros((1, 8, 8)))), "unsupported dtype 'float64'"),
    (pb.PredictRequest(tensor=tensor(np.zeros((2, 1, 27, 28), np.float32))), "does not match the model input [B,1,28,28]"),
    (pb.PredictRequest(tensor=tensor(np.zeros((2, 28, 28, 2), np.uint8))), "must be [B,H,W] or [B,H,W,C]"),
    (pb.PredictRequest(tensor=pb.Tensor(dtype="float32", shape=[1, 1, 28, 28], data=b"\0" * 100)),
     "holds 100 bytes but shape [1, 1, 28, 28] of float32 needs 3136"),
    (pb.PredictRequest(tensor=tensor(np.full((2, 1, 28, 28), np.nan, np.float32))), "NaN/Inf"),
    (pb.PredictRequest(tensor=tensor(np.pad(np.full((1, 1, 1, 1), np.inf, np.float32), ((1, 0), (0, 0), (0, 27), (0, 27))))),
     "first in item 1"),
    (pb.PredictRequest(tensor=tensor(np.zeros((0, 1, 28, 28), np.float32))), "empty batch"),
    (pb.PredictRequest(images=pb.EncodedImages()), "empty batch"),
    (pb.PredictRequest(tensor=tensor(np.zeros((65, 8, 8), np.uint8))), "batch of 65 items is above the limit of 64"),
    (pb.PredictRequest(images=pb.EncodedImages(images=[b"\x89PNG not really"])), "image 0 is not a PNG or JPEG image"),
    (pb.PredictRequest(images=pb.EncodedImages(images=[png(np.zeros((28, 28), np.uint8)), png(noise(1)[0])[:-40]])),
     "image 1: cannot decode image"),
    (pb.PredictRequest(tensor=pb.Tensor(dtype="uint8", shape=[1, -8, 8], data=b"")), "negative dimension"),
    (pb.PredictRequest(model="mnist", tensor=tensor(np.zeros((1, 8, 8), np.uint8))), "unknown model 'mnist'"),
    (pb.PredictRequest(version=9, tensor=tensor(np.zeros((1, 8, 8), np.uint8))), "no version 9"),
]


def test_finite_check_accepts_the_largest_float32_and_counts_every_non_finite_value():
    # the check sums in float64, which cannot overflow on float32 values: only NaN/Inf make it non-finite
    from types import SimpleNamespace

    from oodguard.serve.inputs import InputError, InputLimits, tensor_input

    served = SimpleNamespace(input_shape=(1, 28, 28), max_batch=64, model="digits", version=1)
    huge = np.full((2, 1, 28, 28), np.finfo(np.float32).max, np.float32)
    assert tensor_input(pb.PredictRequest(tensor=tensor(huge)), served, InputLimits()).shape == (2, 1, 28, 28)
    mixed = np.zeros((3, 1, 28, 28), np.float32)
    mixed[1, 0, 0, 0], mixed[2, 0, 5, 5], mixed[2, 0, 6, 6] = np.inf, -np.inf, np.nan
    with pytest.raises(InputError, match=r"holds 3 NaN/Inf value\(s\) \(first in item 1\)"):
        tensor_input(pb.PredictRequest(tensor=tensor(mixed)), served, InputLimits())


def test_bad_inputs_are_invalid_argument_while_good_traffic_flows(gateway, stub, digits_test_images):
    good = pb.PredictRequest(tensor=tensor(digits_test_images[0][:8]))
    stop, outcomes = threading.Event(), []

    def traffic():
        with grpc.insecure_channel(gateway.target) as channel:
            own = pb_grpc.OODGuardStub(channel)
            while not stop.is_set():
                try:
                    outcomes.append(len(own.Predict(good, timeout=10).predictions))
                except grpc.RpcError as exc:
                    outcomes.append(exc.code())

    threads = [threading.Thread(target=traffic) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for request, message in BAD_REQUESTS:
            with pytest.raises(grpc.RpcError) as info:
                stub.Predict(request, timeout=10)
            assert info.value.code() == INVALID, (message, info.value.details())
            assert message in info.value.details(), info.value.details()
        # above the configured max message size (1 MiB here)
        with pytest.raises(grpc.RpcError) as info:
            stub.Predict(pb.PredictRequest(tensor=tensor(np.zeros((5, 512, 512), np.uint8))), timeout=10)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        time.sleep(0.2)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert len(outcomes) >= 3 and set(outcomes) == {8}, set(outcomes)


def test_health_reflection_and_model_info(gateway):
    with grpc.insecure_channel(gateway.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "oodguard.v1.OODGuard"):
            assert health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status == \
                health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        answers = list(reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = {s.name for s in answers[0].list_services_response.service}
        assert {"oodguard.v1.OODGuard", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names
        info = pb_grpc.OODGuardStub(channel).ModelInfo(pb.ModelInfoRequest(), timeout=5)
        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.OODGuardStub(channel).ModelInfo(pb.ModelInfoRequest(model="mnist"), timeout=5)
        assert err.value.code() == INVALID and "unknown model 'mnist'" in err.value.details()
    cal = calibration_of(gateway.settings.repository)
    assert info.backend == "embedded" and list(info.policy.scores) == ["fused"] and info.policy.mode == "any"
    assert [m.name for m in info.models] == ["digits"] and info.models[0].latest_version == 1
    version = info.models[0].versions[0]
    assert version.version == 1 and list(version.class_names) == [str(i) for i in range(8)]
    assert list(version.input.shape) == [1, 28, 28] and version.input.dtype == "float32" and version.input.max_batch_size == 64
    assert version.input.preprocessing.height == 28 and version.input.preprocessing.mean[0] == pytest.approx(cal.model["preprocessing"]["mean"][0])
    # the training run's test accuracy, recorded in calibration.json by export
    accuracy = cal.model["test_accuracy"]
    assert version.test_accuracy.overall == pytest.approx(accuracy["overall"]) and accuracy["overall"] > 0.9
    assert version.test_accuracy.n == accuracy["n"] and dict(version.test_accuracy.per_class) == pytest.approx(accuracy["per_class"])
    thresholds = {t.score: t for t in version.thresholds}
    assert list(thresholds) == cal.model["scores"]
    for name, t in thresholds.items():
        ref = cal.thresholds[name]
        assert (t.threshold, t.n, t.accepted, t.achieved_tpr, t.target_tpr) == (
            ref.threshold, ref.n, ref.accepted, ref.achieved_tpr, ref.target_tpr)
        assert (t.achieved_tpr_ci95_low, t.achieved_tpr_ci95_high) == ref.achieved_tpr_ci95
        assert t.deciding == (name == "fused")


class FlakyBackend(Backend):
    """The embedded backend behind a switch that makes every call fail like a server that went down;
    records the timeouts it was given."""

    def __init__(self, inner: Backend):
        self.inner, self.down, self.timeouts = inner, False, []

    async def start(self):
        await self.inner.start()

    async def close(self):
        await self.inner.close()

    async def infer(self, model, version, inputs, timeout_s):
        self.timeouts.append(timeout_s)
        if self.down:
            raise BackendUnavailable("injected: connection refused")
        return await self.inner.infer(model, version, inputs, timeout_s)

    async def ready_versions(self):
        if self.down:
            raise BackendUnavailable("injected: connection refused")
        return await self.inner.ready_versions()


def _health(channel) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="oodguard.v1.OODGuard"),
                                                     timeout=5).status


def _wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.05)


def test_backend_failure_unavailable_health_flips_and_recovers(start_gateway, repo_copy):
    backends = []

    def factory(settings):
        backends.append(FlakyBackend(EmbeddedBackend(settings.repository)))
        return backends[0]

    gw = start_gateway(repo_copy, backend_factory=factory, poll_interval_s=0.1)
    backend = backends[0]
    request = pb.PredictRequest(tensor=tensor(noise(1)))
    with grpc.insecure_channel(gw.target) as channel:
        stub = pb_grpc.OODGuardStub(channel)
        assert stub.Predict(request, timeout=3).version == 1
        assert 0 < backend.timeouts[-1] <= 3.1  # the client's 3 s deadline reached the backend (gRPC may round it up)
        assert stub.Predict(request).version == 1  # no client deadline: the backend gets backend_timeout_s
        assert gw.settings.backend_timeout_s == 60.0 and 59.0 < backend.timeouts[-1] <= 60.0  # less batch wait
        assert _health(channel) == health_pb2.HealthCheckResponse.SERVING
        backend.down = True
        with pytest.raises(grpc.RpcError) as info:
            stub.Predict(request, timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "injected: connection refused" in info.value.details()
        assert _health(channel) == health_pb2.HealthCheckResponse.NOT_SERVING
        backend.down = False
        _wait_for(lambda: _health(channel) == health_pb2.HealthCheckResponse.SERVING)  # the poll saw it back
        assert len(stub.Predict(request, timeout=5).predictions) == 1


def test_queue_full_reject_and_unflagged_sampling(start_gateway, repo_copy, digits_test_images):
    gw = start_gateway(repo_copy, queue_max_size=3, queue_full_policy="reject")
    with grpc.insecure_channel(gw.target) as channel:
        stub = pb_grpc.OODGuardStub(channel)
        items = stub.Predict(pb.PredictRequest(tensor=tensor(noise(6, seed=3))), timeout=10).predictions
    flagged = [p for p in items if p.decision.ood]
    assert len(flagged) >= 4
    assert [p.queue_status for p in flagged] == [pb.QUEUED] * 3 + [pb.REJECTED_QUEUE_FULL] * (len(flagged) - 3)
    stats = gw.gateway.queue.stats()
    assert (stats.size, stats.rejected) == (3, len(flagged) - 3)

    sampler = start_gateway(repo_copy, unflagged_sample_fraction=1.0, sample_seed=0)
    with grpc.insecure_channel(sampler.target) as channel:
        items = pb_grpc.OODGuardStub(channel).Predict(
            pb.PredictRequest(tensor=tensor(digits_test_images[0][:20])), timeout=10).predictions
    unflagged = [p for p in items if not p.decision.ood]
    assert unflagged and all(p.sampled and p.queue_status == pb.QUEUED for p in unflagged)
    assert not any(p.sampled for p in items if p.decision.ood)
    stats = sampler.gateway.queue.stats()
    assert (stats.size, stats.sampled) == (20, len(unflagged))


def test_startup_refuses_a_policy_the_model_cannot_satisfy(start_gateway, repo_copy):
    from oodguard.serve.decision import PolicyError

    with pytest.raises(PolicyError, match=r"\['odin'\] not exported"):
        start_gateway(repo_copy, decision_scores=("sisome", "odin"))


def _concurrent_predictions(target: str, requests: list[pb.PredictRequest]) -> list[pb.PredictResponse]:
    """Send every request at once from one asyncio client (many calls in flight on one channel)."""
    import asyncio

    async def main():
        async with grpc.aio.insecure_channel(target) as channel:
            stub = pb_grpc.OODGuardStub(channel)
            return await asyncio.gather(*(stub.Predict(r, timeout=30) for r in requests))

    return asyncio.run(main())


@pytest.mark.parametrize("max_batch", [0, 1])
def test_concurrent_requests_share_backend_calls_and_get_their_own_answers(start_gateway, repo_copy, digits_test_images,
                                                                           max_batch):
    images, _ = digits_test_images
    gw = start_gateway(repo_copy, max_batch=max_batch)
    cal = calibration_of(repo_copy)
    x = Preprocessing.from_dict(cal.model["preprocessing"]).apply(images[:48])
    direct = OnnxModel(repo_copy / "digits" / "1" / "model.onnx").run(x)
    requests = [pb.PredictRequest(tensor=tensor(x[i:i + 1]), request_id=f"r{i}") for i in range(48)]
    batcher = gw.gateway.batcher
    before = len(batcher.batch_rows)
    responses = _concurrent_predictions(gw.target, requests)
    rows = list(batcher.batch_rows)[before:]
    assert sum(rows) == 48
    if max_batch == 1:  # batching off: one backend call per request
        assert rows == [1] * 48
    else:  # merged while the single ONNX Runtime worker was busy
        assert len(rows) < 48 and max(rows) > 1 and max(rows) <= 64
    for i, response in enumerate(responses):
        assert response.request_id == f"r{i}" and len(response.predictions) == 1
        p = response.predictions[0]
        for name in cal.model["scores"]:  # each request got its own rows of the merged batch
            assert p.scores[name] == pytest.approx(float(direct[name][i]), rel=1e-4, abs=1e-4)
        assert p.class_index == int(np.argmax(direct["logits"][i]))
        assert p.decision.ood == bool(direct["fused"][i] > cal.thresholds["fused"].threshold)


def test_with_triton_unreachable_at_start_predict_is_unavailable_not_a_bad_request(start_gateway, repo_copy):
    """An outage is UNAVAILABLE (what the SDK retries), never INVALID_ARGUMENT; a request naming an unknown model
    while nothing is served is the same outage."""
    from .conftest import free_port

    gw = start_gateway(repo_copy, backend="triton", triton_url=f"127.0.0.1:{free_port()}")
    with grpc.insecure_channel(gw.target) as channel:
        stub = pb_grpc.OODGuardStub(channel)
        for request in (pb.PredictRequest(tensor=tensor(noise(1))), pb.PredictRequest(tensor=tensor(noise(1)), model="x")):
            with pytest.raises(grpc.RpcError) as info:
                stub.Predict(request, timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "no model is being served" in info.value.details() and "backend is unreachable" in info.value.details()


class ReloadingBackend(FlakyBackend):
    """The embedded backend answering without the ``fused`` output while ``reloading``: what Triton returns for a
    moment after the model's config grew and before it reloaded."""

    reloading = False

    async def infer(self, model, version, inputs, timeout_s):
        result = await self.inner.infer(model, version, inputs, timeout_s)
        if self.reloading:
            result.outputs.pop("fused", None)
        return result


def test_outputs_lacking_a_deciding_score_are_unavailable_then_served(start_gateway, repo_copy):
    backends = []

    def factory(settings):
        backends.append(ReloadingBackend(EmbeddedBackend(settings.repository)))
        return backends[0]

    gw = start_gateway(repo_copy, backend_factory=factory)
    request = pb.PredictRequest(tensor=tensor(noise(1)))
    with grpc.insecure_channel(gw.target) as channel:
        stub = pb_grpc.OODGuardStub(channel)
        backends[0].reloading = True
        with pytest.raises(grpc.RpcError) as info:
            stub.Predict(request, timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # a retry succeeds: clients retry UNAVAILABLE
        assert "lack score(s) ['fused']" in info.value.details() and "retry" in info.value.details()
        backends[0].reloading = False
        assert list(stub.Predict(request, timeout=5).predictions[0].decision.deciding_scores) == ["fused"]


class HangingBackend(FlakyBackend):
    """The embedded backend whose inference hangs while ``hanging`` (until the call's timeout runs out, then
    DeadlineExceeded, as the Triton backend reports it), while its version listing still answers: a model stuck
    executing, which the registry's poll cannot see."""

    hanging = False

    async def infer(self, model, version, inputs, timeout_s):
        self.timeouts.append(timeout_s)
        if self.hanging:
            await asyncio.sleep(timeout_s)
            raise DeadlineExceeded(f"no answer within {timeout_s:.2f}s")
        return await self.inner.infer(model, version, inputs, timeout_s)


def test_consecutive_backend_timeouts_turn_health_not_serving_and_an_answer_turns_it_back(start_gateway, repo_copy):
    backends = []

    def factory(settings):
        backends.append(HangingBackend(EmbeddedBackend(settings.repository)))
        return backends[0]

    gw = start_gateway(repo_copy, backend_factory=factory, backend_timeout_s=0.3, poll_interval_s=30)
    request = pb.PredictRequest(tensor=tensor(noise(1)))
    with grpc.insecure_channel(gw.target) as channel:
        stub = pb_grpc.OODGuardStub(channel)
        backends[0].hanging = True
        for n in range(3):
            assert _health(channel) == health_pb2.HealthCheckResponse.SERVING  # not before the third
            with pytest.raises(grpc.RpcError) as info:
                stub.Predict(request)  # no client deadline: the backend gets backend_timeout_s
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert _health(channel) == health_pb2.HealthCheckResponse.NOT_SERVING
        for _ in range(3):  # a client's own short deadline says nothing about the backend
            with pytest.raises(grpc.RpcError):
                stub.Predict(request, timeout=0.05)
        backends[0].hanging = False
        assert len(stub.Predict(request, timeout=5).predictions) == 1
        assert _health(channel) == health_pb2.HealthCheckResponse.SERVING
