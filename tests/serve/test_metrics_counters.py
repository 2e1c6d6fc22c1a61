"""Counters of the request path: items that failed closed, refusals and bad requests by a bounded reason,
and aborted or cancelled calls with their status."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import grpc
import numpy as np
import pytest

from oodguard.calibration import Calibration
from oodguard.serve.decision import DecisionPolicy, DecisionRule
from oodguard.serve.metrics import BAD_REQUEST_REASONS, REFUSED_REASONS, GatewayMetrics

from .metrics_helpers import generate, parse, samples


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
