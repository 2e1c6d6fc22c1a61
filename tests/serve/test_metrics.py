"""Prometheus metrics of a real gateway on the digits model: scrape the HTTP endpoint after ID and noise
traffic and check the counters, the threshold gauges and the calibration-derived histogram buckets; a version
decided by the fallback, backend errors and queue rejections, the endpoint off by default."""

from __future__ import annotations

import math

import grpc
import numpy as np
import pytest

from oodguard.calibration import Calibration
from oodguard.serve.embedded import EmbeddedBackend
from oodguard.serve.metrics import expected_flag_rates, score_buckets
from oodguard.serve.v1 import oodguard_pb2 as pb
from oodguard.serve.v1 import oodguard_pb2_grpc as pb_grpc

from .conftest import free_port
from .metrics_helpers import maybe, samples, scrape, scrape_until, value
from .test_server import FlakyBackend, noise, tensor


def test_metrics_after_id_and_noise_traffic(start_gateway, repo_copy, digits_test_images):
    port = free_port()
    gw = start_gateway(repo_copy, metrics_port=port, decision_scores=("sisome", "energy"), decision_mode="any")
    assert gw.gateway.metrics_port == port
    cal = Calibration.load(repo_copy / "digits" / "1" / "calibration.json")
    images = digits_test_images[0][:96]
    predictions, writes = [], 0  # writes: requests with a flagged item (one queue write each)
    with grpc.insecure_channel(gw.target) as channel:
        stub = pb_grpc.OODGuardStub(channel)
        for start in range(0, len(images), 32):
            response = stub.Predict(pb.PredictRequest(tensor=tensor(images[start:start + 32]),
                                                      request_id=f"secret-request-{start}"), timeout=10)
            predictions.extend(response.predictions)
            writes += any(p.decision.ood for p in response.predictions)
        for seed in range(2):
            response = stub.Predict(pb.PredictRequest(tensor=tensor(noise(16, seed)), request_id=f"secret-noise-{seed}",
                                                      metadata={"camera": "north"}), timeout=10)
            predictions.extend(response.predictions)
            writes += any(p.decision.ood for p in response.predictions)
        for bad in (pb.PredictRequest(tensor=pb.Tensor(dtype="float64", shape=[1], data=b"\0" * 8)),
                    pb.PredictRequest(tensor=tensor(noise(1)), model="no-such-model-abc123")):
            with pytest.raises(grpc.RpcError) as info:
                stub.Predict(bad, timeout=10)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    n_items = len(predictions)
    flagged = [p for p in predictions if p.decision.ood]
    fam = scrape_until(port, lambda f: maybe(f, "oodguard_queue_accepted_total") == len(flagged),
                       what="the queue statistics")
    text, _ = scrape(port)
    # no request ids, client metadata or unknown model names in labels (bounded cardinality)
    assert "secret-" not in text and "north" not in text and "no-such-model" not in text

    # requests by model, version and gRPC status
    assert value(fam, "oodguard_requests_total", model="digits", version="1", code="OK") == 5
    assert value(fam, "oodguard_requests_total", model="digits", version="1", code="INVALID_ARGUMENT") == 1
    assert value(fam, "oodguard_requests_total", model="unknown", version="", code="INVALID_ARGUMENT") == 1
    assert value(fam, "oodguard_request_duration_seconds_count", model="digits") == 6
    assert value(fam, "oodguard_backend_duration_seconds_count", model="digits") == 5
    assert not samples(fam, "oodguard_backend_errors_total")

    # items, flagged items and the deciding score that flagged them
    assert n_items == 96 + 32 and len(flagged) >= 28  # (nearly) every noise item is flagged
    assert value(fam, "oodguard_items_total", model="digits", version="1") == n_items
    assert value(fam, "oodguard_flagged_items_total", model="digits", version="1") == len(flagged)
    for name in ("sisome", "energy"):
        crossed = sum(name in p.decision.crossed for p in flagged)
        got = samples(fam, "oodguard_flagged_total", model="digits", version="1", score=name)
        assert (got[0].value if got else 0) == crossed
    assert not samples(fam, "oodguard_flagged_total", score="msp")  # not a deciding score

    # thresholds and the calibrated flag rate (p0) from the calibration
    for name, t in cal.thresholds.items():
        deciding = "true" if name in ("sisome", "energy") else "false"
        assert value(fam, "oodguard_threshold", model="digits", version="1", score=name, deciding=deciding) == \
            pytest.approx(t.threshold, rel=1e-12)
    p0 = sum((cal.thresholds[n].n + 1 - cal.thresholds[n].accepted) / (cal.thresholds[n].n + 1) for n in ("sisome", "energy"))
    assert value(fam, "oodguard_calibrated_flag_rate", model="digits", version="1") == pytest.approx(p0)
    upper = value(fam, "oodguard_calibrated_flag_rate_upper", model="digits", version="1")
    assert p0 < upper <= 1.0
    assert value(fam, "oodguard_model_info", model="digits", version="1", latest="true", backend="embedded") == 1
    assert value(fam, "oodguard_serving") == 1

    # per-score histograms: bucket bounds from the calibration (the threshold among them), every item counted
    for name, t in cal.thresholds.items():
        buckets = samples(fam, "oodguard_score_bucket", model="digits", version="1", score=name)
        bounds = [float(s.labels["le"]) for s in buckets]
        assert bounds == list(score_buckets(t))
        assert bounds[-1] == math.inf and len(bounds) >= 10
        assert t.threshold in bounds
        calib = t.sorted_scores
        assert bounds[0] <= np.quantile(calib, 0.02) and max(b for b in bounds if b < math.inf) > calib[-1]
        # (_count and _sum exist only where every bound is >= 0, as OpenMetrics wants; +Inf is the count)
        if bounds[0] >= 0:
            assert value(fam, "oodguard_score_count", model="digits", version="1", score=name) == n_items
        counts = [s.value for s in buckets]
        assert counts == sorted(counts) and counts[-1] == n_items
        scores = np.array([p.scores[name] for p in predictions])
        at = bounds.index(t.threshold)
        # the bucket at the threshold holds exactly the items that did not cross it
        assert counts[at] == sum(name not in p.decision.crossed for p in predictions)
        if bounds[0] >= 0:
            assert value(fam, "oodguard_score_sum", model="digits", version="1", score=name) == \
                pytest.approx(float(scores.sum()), rel=1e-4, abs=1e-3)

    # the queue: one write per request with flagged items, depth and the queue's own counters
    assert value(fam, "oodguard_queue_write_duration_seconds_count", model="digits") == writes
    assert value(fam, "oodguard_queue_size") == len(flagged)
    assert value(fam, "oodguard_queue_accepted_total") == len(flagged)
    assert value(fam, "oodguard_queue_rejected_total") == 0 and value(fam, "oodguard_queue_evicted_total") == 0
    assert value(fam, "oodguard_queue_spool_backlog") == 0 and value(fam, "oodguard_queue_stats_up") == 1
    assert value(fam, "oodguard_queue_reachable") == 1
    assert value(fam, "oodguard_queue_max_size") == gw.settings.queue_max_size
    assert value(fam, "oodguard_queue_max_bytes") == gw.settings.queue_max_bytes
    assert value(fam, "oodguard_queue_bytes") > 0
    assert not samples(fam, "oodguard_queue_write_failures_total")


def test_a_version_decided_by_the_fallback_reports_its_own_deciding_scores_and_p0(start_gateway, repo_copy):
    """Version 2 was exported without fused: the default policy decides it by sisome, and /metrics says so (its
    deciding threshold and p0 are sisome's) while version 1 reports fused's."""
    import json
    import shutil

    shutil.copytree(repo_copy / "digits" / "1", repo_copy / "digits" / ".staging-2")
    path = repo_copy / "digits" / ".staging-2" / "calibration.json"
    raw = json.loads(path.read_text())
    raw["model"]["scores"].remove("fused")
    del raw["scores"]["fused"]
    path.write_text(json.dumps(raw))
    (repo_copy / "digits" / ".staging-2").rename(repo_copy / "digits" / "2")
    port = free_port()
    start_gateway(repo_copy, metrics_port=port)
    fam = scrape_until(port, lambda f: len(samples(f, "oodguard_calibrated_flag_rate")) == 2, what="both versions")
    cal = Calibration.load(repo_copy / "digits" / "1" / "calibration.json")
    for version, deciding in (("1", "fused"), ("2", "sisome")):
        t = cal.thresholds[deciding]
        assert value(fam, "oodguard_threshold", model="digits", version=version, score=deciding, deciding="true") == \
            pytest.approx(t.threshold, rel=1e-12)
        assert value(fam, "oodguard_calibrated_flag_rate", model="digits", version=version) == \
            pytest.approx((t.n + 1 - t.accepted) / (t.n + 1))
    assert not samples(fam, "oodguard_threshold", version="2", score="fused")


def test_backend_errors_and_queue_rejections_are_counted(start_gateway, repo_copy):
    backends = []

    def factory(settings):
        backends.append(FlakyBackend(EmbeddedBackend(settings.repository)))
        return backends[0]

    port = free_port()
    gw = start_gateway(repo_copy, backend_factory=factory, metrics_port=port, queue_max_size=3, poll_interval_s=30)
    with grpc.insecure_channel(gw.target) as channel:
        stub = pb_grpc.OODGuardStub(channel)
        response = stub.Predict(pb.PredictRequest(tensor=tensor(noise(8))), timeout=10)
        refused = sum(p.queue_status == pb.REJECTED_QUEUE_FULL for p in response.predictions)
        assert refused >= 1
        backends[0].down = True
        with pytest.raises(grpc.RpcError) as info:
            stub.Predict(pb.PredictRequest(tensor=tensor(noise(1))), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    # the client sees the aborted call's status a moment before the handler's bookkeeping ends, and the queue
    # statistics come from their own thread: poll briefly
    fam = scrape_until(port, lambda f: maybe(f, "oodguard_requests_total", code="UNAVAILABLE") is not None
                       and maybe(f, "oodguard_queue_rejected_total") == refused, what="the aborted call and queue")
    assert value(fam, "oodguard_backend_errors_total", model="digits", reason="unavailable") == 1
    assert value(fam, "oodguard_requests_total", model="digits", version="1", code="UNAVAILABLE") == 1
    assert value(fam, "oodguard_backend_duration_seconds_count", model="digits") == 2
    assert value(fam, "oodguard_queue_rejected_items_total", model="digits") == refused
    assert value(fam, "oodguard_queue_rejected_total") == refused
    assert value(fam, "oodguard_serving") == 0


def test_metrics_off_by_default(start_gateway, repo_copy):
    gw = start_gateway(repo_copy)
    assert gw.gateway.metrics_port is None and gw.gateway.metrics._server is None
    assert gw.gateway.metrics._state.stats._thread is None  # and nobody reads the queue statistics


def test_score_buckets_and_expected_rates_from_a_calibration(digits_export):
    from oodguard.serve.decision import DecisionPolicy

    cal = Calibration.load(digits_export[2] / "digits" / "1" / "calibration.json")
    t = cal.thresholds["sisome"]
    bounds = score_buckets(t)
    assert list(bounds) == sorted(set(bounds)) and bounds[-1] == math.inf
    share_below_threshold = np.mean(t.sorted_scores <= t.threshold)
    assert share_below_threshold == pytest.approx(t.accepted / t.n)

    class Served:  # the fields expected_flag_rates reads
        calibration = cal

    one = expected_flag_rates(Served, DecisionPolicy(("sisome",), "any"))
    assert one[0] == pytest.approx((t.n + 1 - t.accepted) / (t.n + 1)) and 0.03 < one[0] < 0.08
    assert one[1] == pytest.approx(1 - t.achieved_tpr_ci95[0])
    both_any = expected_flag_rates(Served, DecisionPolicy(("sisome", "energy"), "any"))
    both_all = expected_flag_rates(Served, DecisionPolicy(("sisome", "energy"), "all"))
    assert both_all[0] <= one[0] <= both_any[0]
