"""The service against hostile traffic, over real gRPC on the digits model: it fails closed, stays bounded in
memory and work, refuses overload at once, and answers undecodable bodies INVALID_ARGUMENT (counted, one
log line)."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest

from oodguard.serve.v1 import oodguard_pb2 as pb
from oodguard.serve.v1 import oodguard_pb2_grpc as pb_grpc

from .conftest import copy_repository
from .test_inputs import bomb_png, encoded
from .test_server import noise, tensor

PAGE = os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples this process's resident memory every 5 ms; ``peak_mb`` is the most above the start."""

    def __init__(self):
        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * PAGE

    def _run(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._rss())

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def peak_mb(self) -> float:
        return (self.peak - self.start) / 2**20


def metric(gateway, name: str, **labels) -> float:
    return gateway.gateway.metrics.registry.get_sample_value(name, labels) or 0.0


def requests_with_code(gateway, code: str) -> float:
    """Predict calls counted with ``code``, whatever model label they got (a body that does not parse, or a
    call refused before it was parsed, counts under the default model or ``unknown``)."""
    return sum(metric(gateway, "oodguard_requests_total", model=model, version=version, code=code)
               for model, version in (("digits", "1"), ("unknown", "")))


def code_of(call) -> grpc.StatusCode:
    try:
        call()
        return grpc.StatusCode.OK
    except grpc.RpcError as exc:
        return exc.code()


@pytest.fixture
def gateway(start_gateway, repo_copy):
    return start_gateway(repo_copy)


@pytest.fixture
def stub(gateway):
    with grpc.insecure_channel(gateway.target) as channel:
        yield pb_grpc.OODGuardStub(channel)


def test_decompression_bombs_are_refused_before_decoding_with_memory_bounded(gateway, stub):
    bomb = bomb_png()
    requests = [pb.PredictRequest(images=pb.EncodedImages(images=[bomb] * n)) for n in (1, 1, 1, 64)]
    with PeakRSS() as rss, ThreadPoolExecutor(4) as pool:
        errors = list(pool.map(lambda r: _error(lambda: stub.Predict(r, timeout=10)), requests))
    for error in errors:
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "declares 13000x13000 = 169000000 pixels; the limit is 16777216 per image" in error.details()
    # decoding one of them would take 507 MB (13000 x 13000 x 3)
    assert rss.peak_mb < 60, f"resident memory rose by {rss.peak_mb:.0f} MB"
    assert metric(gateway, "oodguard_bad_requests_total", reason="image_too_large") == 4
    assert metric(gateway, "oodguard_requests_total", model="digits", version="1", code="INVALID_ARGUMENT") == 4


def _error(call) -> grpc.RpcError | None:
    try:
        call()
    except grpc.RpcError as exc:
        return exc
    return None


def test_image_flood_cannot_starve_tensor_requests(start_gateway, repo_copy, digits_test_images):
    """16 requests of 16 large images each (2048 x 2048, tens of ms each to decode) against one decoder thread
    with room for 64 images: the rest are refused at once, and uint8 / float32 tensor requests sent during
    the flood all answer within their 3 s deadline."""
    gw = start_gateway(repo_copy, decode_workers=1, decode_queue_max_images=64)
    big = encoded(np.random.default_rng(0).integers(0, 2, (2048, 2048), dtype=np.uint8), "PNG")  # ~0.5 MB
    flood = pb.PredictRequest(images=pb.EncodedImages(images=[big] * 16))
    images = digits_test_images[0]
    good = [pb.PredictRequest(tensor=tensor(images[i:i + 4])) for i in range(0, 48, 4)]
    with grpc.insecure_channel(gw.target, options=[("grpc.max_send_message_length", 128 * 2**20)]) as channel:
        stub = pb_grpc.OODGuardStub(channel)
        with ThreadPoolExecutor(28) as pool:
            flooding = [pool.submit(code_of, lambda: stub.Predict(flood, timeout=60)) for _ in range(16)]
            time.sleep(0.3)  # the decoder is busy now
            started = time.perf_counter()
            answers = list(pool.map(lambda r: code_of(lambda: stub.Predict(r, timeout=3)), good))
            good_seconds = time.perf_counter() - started
            flood_codes = [f.result() for f in flooding]
    assert answers == [grpc.StatusCode.OK] * len(good), answers
    assert good_seconds < 3
    refused = flood_codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert flood_codes.count(grpc.StatusCode.OK) + refused == 16 and refused >= 8, flood_codes
    assert metric(gw, "oodguard_refused_requests_total", reason="decode_queue") == refused


def test_unscorable_items_fail_closed_and_are_queued(start_gateway, repo_copy):
    # no input-range check here: the NaN scores alone must flag
    gw = start_gateway(repo_copy, input_range_margin=float("inf"))
    x = np.full((3, 1, 28, 28), 3e38, np.float32)
    x[1] = -3e38
    with grpc.insecure_channel(gw.target) as channel:
        response = pb_grpc.OODGuardStub(channel).Predict(pb.PredictRequest(tensor=tensor(x), request_id="absurd"), timeout=10)
    assert len(response.predictions) == 3
    for item in response.predictions:
        assert any(np.isnan(v) or np.isinf(v) for v in item.scores.values())
        assert item.decision.ood and "unscorable" in item.decision.reasons
        assert item.queue_status == pb.QUEUED and item.queue_record_id
    stored = gw.gateway.queue.get([p.queue_record_id for p in response.predictions])
    assert [r.flagged for r in stored] == [True] * 3
    assert all("unscorable" in r.decision["reasons"] for r in stored)
    assert metric(gw, "oodguard_unscorable_items_total", model="digits", version="1") == 3
    assert metric(gw, "oodguard_flagged_items_total", model="digits", version="1") == 3


def test_inputs_outside_the_model_range_are_flagged(gateway, stub, digits_test_images):
    rng = np.random.default_rng(0)
    absurd = np.stack([np.full((1, 28, 28), 1e3, np.float32), rng.normal(0, 1e4, (1, 28, 28)).astype(np.float32)])
    response = stub.Predict(pb.PredictRequest(tensor=tensor(absurd)), timeout=10)
    for item in response.predictions:
        assert item.decision.ood and "input_range" in item.decision.reasons and item.queue_status == pb.QUEUED
    assert metric(gateway, "oodguard_input_out_of_range_items_total", model="digits", version="1") == 2
    # real digits, sent as preprocessed float32, stay within the range: none is flagged for it
    from oodguard.calibration import Calibration
    from oodguard.preprocess import Preprocessing

    cal = Calibration.load(gateway.settings.repository / "digits" / "1" / "calibration.json")
    x = Preprocessing.from_dict(cal.model["preprocessing"]).apply(digits_test_images[0][:64])
    items = stub.Predict(pb.PredictRequest(tensor=tensor(x)), timeout=10).predictions
    assert not any("input_range" in p.decision.reasons for p in items)
    assert sum(p.decision.ood for p in items) < 12
    assert all(list(p.decision.reasons) == ["threshold"] for p in items if p.decision.ood)


def test_request_id_and_metadata_limits(start_gateway, repo_copy):
    gw = start_gateway(repo_copy, max_request_id_bytes=64, max_metadata_bytes=1024)
    with grpc.insecure_channel(gw.target) as channel:
        stub = pb_grpc.OODGuardStub(channel)
        x = tensor(noise(4))
        long_id = _error(lambda: stub.Predict(pb.PredictRequest(tensor=x, request_id="r" * 1_000_000), timeout=10))
        big_meta = _error(lambda: stub.Predict(pb.PredictRequest(tensor=x, metadata={"k": "v" * 12_000_000}), timeout=10))
        ok = stub.Predict(pb.PredictRequest(tensor=x, request_id="r" * 64, metadata={"k": "v" * 1000}), timeout=10)
    assert long_id.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert long_id.details() == "request_id is 1000000 bytes, above the limit of 64"
    assert big_meta.code() == grpc.StatusCode.INVALID_ARGUMENT and "above the limit of 1024" in big_meta.details()
    queued = [p for p in ok.predictions if p.queue_status == pb.QUEUED]
    assert queued and gw.gateway.queue.stats().accepted == len(queued)  # the refused ones stored nothing


def test_no_record_for_a_reply_that_cannot_be_sent(start_gateway, repo_copy):
    gw = start_gateway(repo_copy, max_message_bytes=16 * 1024)
    small = np.random.default_rng(0).integers(0, 256, (64, 8, 8), dtype=np.uint8)  # resized to 28 x 28
    request = pb.PredictRequest(tensor=tensor(small), top_k=8)
    assert request.ByteSize() < 16 * 1024
    with grpc.insecure_channel(gw.target) as channel:
        error = _error(lambda: pb_grpc.OODGuardStub(channel).Predict(request, timeout=10))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "reply would be" in error.details() and "above the limit of 16384" in error.details()
    assert gw.gateway.queue.stats().accepted == 0
    assert metric(gw, "oodguard_bad_requests_total", reason="reply_too_large") == 1


def test_undecodable_bodies_are_invalid_argument_counted_and_logged_once(gateway, caplog):
    bodies = [b"\xff\xff\xff\xff", b"\x2a\x02\xff\xfe",  # garbage; request_id (field 5) with invalid UTF-8
              b"\x1a\x03abc" + b"\x2a\x02\xc3\x28"]  # model 'abc', then an invalid 2-byte sequence
    with grpc.insecure_channel(gateway.target) as channel:
        raw = channel.unary_unary("/oodguard.v1.OODGuard/Predict")
        with caplog.at_level(logging.WARNING, logger="oodguard.serve"):
            errors = [_error(lambda: raw(body, timeout=10)) for body in bodies * 10]
        info = channel.unary_unary("/oodguard.v1.OODGuard/ModelInfo")
        model_info = _error(lambda: info(b"\xff\xff", timeout=10))
    assert {e.code() for e in errors} == {grpc.StatusCode.INVALID_ARGUMENT}
    assert all("request body is not a valid PredictRequest" in e.details() for e in errors)
    assert model_info.code() == grpc.StatusCode.INVALID_ARGUMENT
    lines = [r for r in caplog.records if "bad request" in r.getMessage()]
    assert 1 <= len(lines) <= 2 and all(r.exc_info is None for r in lines)
    assert metric(gateway, "oodguard_bad_requests_total", reason="undecodable") == 31
    assert requests_with_code(gateway, "INVALID_ARGUMENT") == 30


def test_long_client_strings_are_not_echoed(gateway, stub):
    error = _error(lambda: stub.ModelInfo(pb.ModelInfoRequest(model="m" * 1_000_000), timeout=10))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and len(error.details()) < 300
    error = _error(lambda: stub.Predict(pb.PredictRequest(model="m" * 1_000_000, tensor=tensor(noise(1))), timeout=10))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and len(error.details()) < 300


def test_a_burst_above_the_limits_is_refused_at_once_and_counted(start_gateway, repo_copy):
    """An idle backend holding each batch 400 ms for batch mates keeps requests in flight: of a burst of 24,
    at most 4 are admitted at a time; the rest get RESOURCE_EXHAUSTED at once, every call is counted."""
    gw = start_gateway(repo_copy, max_wait_ms=400, max_inflight_requests=4, max_inflight_items=64)
    request = pb.PredictRequest(tensor=tensor(noise(2)))
    with grpc.insecure_channel(gw.target) as channel:
        stub = pb_grpc.OODGuardStub(channel)
        stub.ModelInfo(pb.ModelInfoRequest(), timeout=10)  # connected

        def call():
            started = time.perf_counter()
            error = _error(lambda: stub.Predict(request, timeout=10))
            return error, time.perf_counter() - started

        with ThreadPoolExecutor(24) as pool:
            results = list(pool.map(lambda _: call(), range(24)))
    refused = [(e, s) for e, s in results if e is not None]
    assert {e.code() for e, _ in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert all(e.details().startswith("overloaded: ") for e, _ in refused)
    assert 24 - len(refused) >= 4 and len(refused) >= 10, len(refused)
    assert max(s for _, s in refused) < 0.35  # at once, not after the 400 ms batch wait
    assert metric(gw, "oodguard_refused_requests_total", reason="inflight_requests") == len(refused)
    assert requests_with_code(gw, "RESOURCE_EXHAUSTED") == len(refused)
    assert metric(gw, "oodguard_requests_total", model="digits", version="1", code="OK") == 24 - len(refused)


def concurrent_refusals(gw, request: pb.PredictRequest, n: int) -> list[grpc.RpcError]:
    """Send ``request`` ``n`` times at once (on a connected channel); the errors of the refused calls."""
    with grpc.insecure_channel(gw.target) as channel:
        stub = pb_grpc.OODGuardStub(channel)
        stub.ModelInfo(pb.ModelInfoRequest(), timeout=10)
        with ThreadPoolExecutor(n) as pool:
            errors = list(pool.map(lambda _: _error(lambda: stub.Predict(request, timeout=10)), range(n)))
    return [e for e in errors if e is not None]


def test_items_in_flight_are_bounded(start_gateway, repo_copy):
    gw = start_gateway(repo_copy, max_wait_ms=400, max_inflight_items=20)
    refused = concurrent_refusals(gw, pb.PredictRequest(tensor=tensor(noise(8))), 6)
    assert {e.code() for e in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert all("items in progress" in e.details() for e in refused)
    assert 6 - len(refused) >= 2 and len(refused) >= 2
    assert metric(gw, "oodguard_refused_requests_total", reason="inflight_items") == len(refused)


def test_a_chunk_flood_is_refused_by_count_while_other_traffic_answers(gateway, stub):
    """A PNG with a million empty private chunks before its pixels (12 MB; Pillow would walk them for seconds,
    holding the interpreter) is refused from its chunk count; health checks and tensor requests answer."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from .test_inputs import png_chunk

    ihdr = png_chunk(b"IHDR", bytes.fromhex("0000001c0000001c0800000000"))  # 28 x 28, 8-bit grayscale
    pixels = png_chunk(b"IDAT", zlib.compress(bytes(29) * 28))
    flood = b"\x89PNG\r\n\x1a\n" + ihdr + png_chunk(b"prVt", b"") * 1_000_000 + pixels + png_chunk(b"IEND", b"")
    request = pb.PredictRequest(images=pb.EncodedImages(images=[flood]))
    error = _error(lambda: stub.Predict(request, timeout=60))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == "image 0: PNG holds more than 256 chunks other than pixel data"
    assert metric(gateway, "oodguard_bad_requests_total", reason="image_structure") == 1
    with grpc.insecure_channel(gateway.target) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert len(stub.Predict(pb.PredictRequest(tensor=tensor(noise(1))), timeout=10).predictions) == 1


def test_bodies_repeating_a_field_millions_of_times_are_refused_before_parsing(gateway):
    """Parsing them would hold the event loop 0.2-0.6 s each; counted on the wire, they are refused, counted
    under their own reason, and tensor requests sent meanwhile answer."""
    from .test_wire import field, metadata_body

    bodies = [field(1, field(2, b"\x01" * 15_000_000)), metadata_body(1_500_000), field(2, b"\x0a\x00" * 8_000_000)]
    options = [("grpc.max_send_message_length", 64 * 2**20)]
    with grpc.insecure_channel(gateway.target, options=options) as channel, ThreadPoolExecutor(4) as pool:
        raw = channel.unary_unary("/oodguard.v1.OODGuard/Predict")
        hostile = [pool.submit(_error, lambda b=b: raw(b, timeout=30)) for b in bodies]
        good = pb_grpc.OODGuardStub(channel)
        answers = [good.Predict(pb.PredictRequest(tensor=tensor(noise(1))), timeout=30) for _ in range(10)]
        errors = [f.result() for f in hostile]
    assert all(len(a.predictions) == 1 for a in answers)
    assert [e.code() for e in errors] == [grpc.StatusCode.INVALID_ARGUMENT] * 3
    assert "'tensor.shape'" in errors[0].details() and "'metadata'" in errors[1].details()
    assert "more than 64 occurrences of field 'images' (the largest batch a served model takes" in errors[2].details()
    assert metric(gateway, "oodguard_bad_requests_total", reason="too_many_fields") == 3


def test_a_batch_that_can_never_be_admitted_is_invalid_argument(start_gateway, repo_copy):
    gw = start_gateway(repo_copy, max_inflight_items=100)
    with grpc.insecure_channel(gw.target) as channel:
        stub = pb_grpc.OODGuardStub(channel)
        many = _error(lambda: stub.Predict(pb.PredictRequest(images=pb.EncodedImages(images=[b"x"] * 9000)), timeout=10))
        huge = _error(lambda: stub.Predict(pb.PredictRequest(tensor=pb.Tensor(dtype="uint8", shape=[2**63 - 1, 8, 8])),
                                           timeout=10))
    for error, n in ((many, 9000), (huge, 2**63 - 1)):
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT  # not "overloaded: retry"
        assert f"batch of {n} items is above the limit of 64" in error.details()
    assert metric(gw, "oodguard_refused_requests_total", reason="inflight_items") == 0


def test_request_bytes_in_flight_are_bounded(start_gateway, repo_copy):
    gw = start_gateway(repo_copy, max_wait_ms=400, max_inflight_bytes=3 * 2**20, max_message_bytes=4 * 2**20,
                       max_metadata_bytes=2 * 2**20)
    request = pb.PredictRequest(tensor=tensor(noise(1)), metadata={"pad": "x" * 2**20})  # 1 MB each
    refused = concurrent_refusals(gw, request, 6)
    assert {e.code() for e in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert all("request bytes in progress" in e.details() for e in refused)
    assert 6 - len(refused) <= 2 and len(refused) >= 3  # at most two 1 MB bodies fit under 3 MB at a time
    assert metric(gw, "oodguard_refused_requests_total", reason="inflight_bytes") == len(refused)


def test_refused_calls_leave_no_reference_cycle_holding_their_request(gateway, stub):
    """context.abort() would leave each refused call in a reference cycle with its parsed request (megabytes
    for images) until Python's next full collection; refusals end the call without one."""
    import gc

    bombs = pb.PredictRequest(images=pb.EncodedImages(images=[bomb_png()] * 8))
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        codes = [code_of(lambda: stub.Predict(bombs, timeout=10)) for _ in range(5)]
        codes += [code_of(lambda: stub.Predict(pb.PredictRequest(model="nope", tensor=tensor(noise(1))), timeout=10))]
        time.sleep(0.2)
        gc.collect()
        held = [o for o in gc.garbage if isinstance(o, pb.PredictRequest)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert codes == [grpc.StatusCode.INVALID_ARGUMENT] * 6
    assert held == []


def test_the_decision_template_is_built_once_per_rule_and_holds_its_thresholds():
    # every item's Decision starts from its version's template (deciding scores, mode, thresholds): one per rule,
    # reused for its batches and slices, never shared by two rules with other thresholds
    import dataclasses

    from oodguard.serve.decision import DecisionPolicy, DecisionRule
    from oodguard.serve.pipeline import DecisionTemplates

    from .test_decision import NAMES, calibration, outputs_for

    templates = DecisionTemplates()
    first = DecisionRule(calibration(), DecisionPolicy(("a", "b"), "all"))
    other_cal = calibration()
    other_cal.thresholds["b"] = dataclasses.replace(other_cal.thresholds["b"], threshold=12.5)
    other = DecisionRule(other_cal, DecisionPolicy(("a", "b"), "all"))
    outputs = outputs_for([(True, False, True), (False, False, False)])
    a, b = first(outputs), other(outputs)
    template = templates(a)
    assert templates(a[1:]) is template and templates(first(outputs)) is template
    assert dict(template.thresholds) == dict.fromkeys(NAMES, 10.0)
    assert list(template.deciding_scores) == ["a", "b"] and template.mode == "all" and not template.p_values
    assert dict(templates(b).thresholds) == {"a": 10.0, "b": 12.5, "c": 10.0}


def test_model_info_gives_the_test_images_behind_each_class_accuracy(start_gateway, repo_copy, tmp_path):
    """ModelInfo's test accuracy carries, per class, the number of test images behind it (as `oodguard train`
    counted them and export recorded them in calibration.json); a calibration.json from before the counts were
    recorded still serves, with the accuracies and an empty count map."""
    from oodguard.calibration import Calibration

    accuracy = Calibration.load(repo_copy / "digits" / "1" / "calibration.json").model["test_accuracy"]
    assert set(accuracy["per_class_n"]) == set(accuracy["per_class"]) and sum(accuracy["per_class_n"].values()) == accuracy["n"]
    older = copy_repository(repo_copy, tmp_path / "older")
    path = older / "digits" / "1" / "calibration.json"
    raw = json.loads(path.read_text())
    del raw["model"]["test_accuracy"]["per_class_n"]
    path.write_text(json.dumps(raw))
    for repository, counts in ((repo_copy, accuracy["per_class_n"]), (older, {})):
        gw = start_gateway(repository)
        with grpc.insecure_channel(gw.target) as channel:
            info = pb_grpc.OODGuardStub(channel).ModelInfo(pb.ModelInfoRequest(), timeout=10)
        served = info.models[0].versions[0].test_accuracy
        assert dict(served.per_class_n) == counts and served.n == accuracy["n"]
        assert dict(served.per_class) == pytest.approx(accuracy["per_class"])
