"""bench/serve_benchmark.py without servers: flags, the aggregation and ratio arithmetic on hand-made cells,
and the traffic built from a real (digits demo) repository."""

import math
import sys
from pathlib import Path

import numpy as np
import pytest

from bench_scripts import load_bench

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def sb():
    return load_bench("serve_benchmark")


def cell(sb, target, concurrency, rnd=0, *, rps=100.0, p50=1.0, p90=2.0, p99=3.0, mean=1.5, server=None, client=50.0,
         requests=100, errors=0, queued=0, cpu_ms=None, gateway_cpu_ms=None):
    return sb.Cell(target, concurrency, rnd, requests, errors, rps, p50, p90, p99, mean, server, client, queued,
                   cpu_ms_per_request=cpu_ms, gateway_cpu_ms_per_request=gateway_cpu_ms)


# -- flags --------------------------------------------------------------------------------------------
def test_backbone_flag_defaults_to_lenet5_and_the_historical_report_folder(sb):
    args = sb.parse_args([])
    assert args.backbone == "lenet5"
    assert args.out == sb.ROOT / "runs" / "bench" / "serve-report"
    assert sb.cache_root(args) == args.cache


def test_resnet18_backbone_gets_its_own_report_and_cache_folders(sb):
    args = sb.parse_args(["--backbone", "resnet18_cifar"])
    assert args.backbone == "resnet18_cifar"
    assert args.out == sb.ROOT / "runs" / "bench" / "serve-report-resnet18_cifar"
    assert sb.cache_root(args) == args.cache / "resnet18_cifar"


def test_an_explicit_out_wins_and_unknown_backbones_are_refused(sb, tmp_path, capsys):
    assert sb.parse_args(["--backbone", "resnet18_cifar", "--out", str(tmp_path)]).out == tmp_path
    with pytest.raises(SystemExit):
        sb.parse_args(["--backbone", "resnet50"])
    assert "invalid choice" in capsys.readouterr().err


# -- aggregate / ratios -------------------------------------------------------------------------------
def test_aggregate_takes_medians_over_rounds_and_sums_counts(sb):
    cells = [
        cell(sb, "gateway-embedded", 1, 0, rps=100.0, p50=2.0, server=80.0, requests=10, errors=1, queued=2),
        cell(sb, "gateway-embedded", 1, 1, rps=300.0, p50=4.0, server=None, requests=20),
        cell(sb, "gateway-embedded", 1, 2, rps=200.0, p50=9.0, server=40.0, requests=30, errors=2),
        cell(sb, "ort-direct", 1, 0, rps=1000.0, p50=0.5),
    ]
    agg = sb.aggregate(cells)
    # ordered by TARGETS, then concurrency
    assert list(agg) == [("ort-direct", 1), ("gateway-embedded", 1)]
    row = agg[("gateway-embedded", 1)]
    assert row["rounds"] == 3 and row["requests"] == 60 and row["errors"] == 3 and row["queued"] == 2
    assert row["throughput_rps"] == 200.0 and row["p50_ms"] == 4.0
    assert row["server_cpu_pct"] == 60.0  # median of the rounds that measured it (80, 40)
    assert agg[("ort-direct", 1)]["server_cpu_pct"] is None
    assert agg[("ort-direct", 1)]["p50_ms"] == 0.5


def test_ratios_compute_overheads_throughput_ratios_and_met_flags(sb):
    cells = [
        cell(sb, "ort-direct", 1, p50=0.25),
        cell(sb, "triton-direct", 1, p50=2.0),
        cell(sb, "gateway-embedded", 1, p50=1.0),          # overhead 0.75 ms: met
        cell(sb, "gateway-embedded-nobatch", 1, p50=1.5),  # overhead 1.25 ms: not met
        cell(sb, "gateway-triton", 1, p50=3.5),            # overhead 1.5 ms: not met
        cell(sb, "triton-direct", 64, rps=1000.0),
        cell(sb, "gateway-triton", 64, rps=850.0),         # 0.85 >= 0.80: met
        cell(sb, "gateway-embedded", 64, rps=300.0),
        cell(sb, "gateway-embedded-nobatch", 64, rps=200.0),  # 1.5 < 2.0: not met
        cell(sb, "grpc-floor", 1, p50=0.6),
        cell(sb, "grpc-floor", 64, rps=1200.0),
    ]
    rat = {r["name"]: r for r in sb.ratios(cells)}
    assert len(rat) == 25
    assert rat["gateway-triton p50 overhead @c=1"]["value"] == 1.5
    assert rat["gateway-triton p50 overhead @c=1"]["met"] is False
    assert rat["gateway-embedded p50 overhead @c=1"]["value"] == 0.75
    assert rat["gateway-embedded p50 overhead @c=1"]["met"] is True
    assert rat["gateway-embedded (micro-batching off) p50 overhead @c=1"]["value"] == 1.25
    assert rat["gateway-embedded (micro-batching off) p50 overhead @c=1"]["met"] is False
    assert rat["throughput gateway-triton / triton-direct @c=64"]["value"] == 0.85
    assert rat["throughput gateway-triton / triton-direct @c=64"]["met"] is True
    assert rat["throughput gateway-embedded micro-batching on / off @c=64"]["value"] == 1.5
    assert rat["throughput gateway-embedded micro-batching on / off @c=64"]["met"] is False
    assert {r["unit"] for r in rat.values()} == {"ms", "x", "%"}
    # informative rows: the overhead split into transport and the gateway's own work, and the floor's ceiling
    assert rat["gRPC round trip alone @c=1"]["value"] == pytest.approx(0.6)
    assert rat["gateway-embedded own work @c=1"]["value"] == pytest.approx(1.0 - 0.6 - 0.25)
    assert rat["throughput grpc-floor / triton-direct @c=64"]["value"] == pytest.approx(1.2)
    assert all(rat[n]["met"] is None and rat[n]["target"] == "(info)" for n in (
        "gRPC round trip alone @c=1", "gateway-embedded own work @c=1", "throughput grpc-floor / triton-direct @c=64"))


def test_cpu_per_request_flagged_workers_and_baseline_ratios(sb):
    cells = [
        cell(sb, "grpc-floor", 1, cpu_ms=0.3), cell(sb, "gateway-embedded", 1, p50=1.0, cpu_ms=0.42),
        cell(sb, "grpc-floor", 64, rps=4000.0, cpu_ms=0.2), cell(sb, "gateway-embedded", 64, rps=1000.0, cpu_ms=0.4),
        cell(sb, "gateway-embedded-flagged", 64, rps=750.0, cpu_ms=0.6),
        cell(sb, "gateway-embedded-workers", 64, rps=1200.0, client=90.0),
        cell(sb, "gateway-baseline", 1, p50=0.98, cpu_ms=1.0),
        cell(sb, "gateway-baseline-flagged", 64, rps=600.0, cpu_ms=0.8),
        cell(sb, "gateway-triton", 1, cpu_ms=0.9, gateway_cpu_ms=0.45),
        cell(sb, "grpc-floor-model", 1, cpu_ms=0.75), cell(sb, "grpc-floor-model", 64, rps=1500.0, cpu_ms=0.5),
    ]
    rat = {r["name"]: r for r in sb.ratios(cells, model_cpu=0.12)}
    assert rat["CPU per request grpc-floor-model / grpc-floor @c=1"]["value"] == pytest.approx(2.5)
    assert rat["CPU per request gateway-embedded / grpc-floor-model @c=1"]["value"] == pytest.approx(0.42 / 0.75)
    assert rat["CPU per request gateway-embedded / grpc-floor-model @c=64"]["value"] == pytest.approx(0.8)
    assert rat["CPU per request gateway-embedded / grpc-floor-model @c=64"]["met"] is None
    assert rat["CPU per request gateway-embedded less the model / grpc-floor @c=1"]["value"] == pytest.approx(1.0)
    c1, c64 = rat["CPU per request gateway-embedded / grpc-floor @c=1"], rat["CPU per request gateway-embedded / grpc-floor @c=64"]
    assert c1["value"] == pytest.approx(1.4) and c1["met"] is True
    assert c64["value"] == pytest.approx(2.0) and c64["met"] is False
    assert rat["throughput all-flagged / unflagged @c=64"]["value"] == 0.75
    assert rat["throughput all-flagged / unflagged @c=64"]["met"] is True
    assert rat["CPU per request all-flagged / unflagged @c=64"]["value"] == pytest.approx(1.5)
    assert rat["throughput --workers N / --workers 1 @c=64"]["value"] == pytest.approx(1.2)
    assert rat["throughput --workers N / --workers 1 @c=64"]["met"] is False
    assert rat["load generator CPU @c=64 (gateway-embedded-workers cells)"]["value"] == 90.0
    assert rat["p50 gateway-embedded / gateway-baseline @c=1"]["value"] == pytest.approx(1.0 / 0.98)
    assert rat["p50 gateway-embedded / gateway-baseline @c=1"]["met"] is True
    assert rat["CPU per request gateway-embedded / gateway-baseline @c=1"]["value"] == pytest.approx(0.42)
    alone = rat["CPU per request gateway-triton's gateway alone / grpc-floor @c=1"]
    assert alone["value"] == pytest.approx(1.5) and alone["met"] is True  # 0.45 / 0.3: tritonserver's CPU left out
    assert rat["CPU per request gateway-triton's gateway alone / grpc-floor @c=64"]["value"] is None  # no such cell
    flagged_vs_before = rat["throughput all-flagged gateway-embedded-flagged / gateway-baseline-flagged @c=64"]
    assert flagged_vs_before["value"] == pytest.approx(1.25) and flagged_vs_before["met"] is None
    assert rat["CPU per request all-flagged gateway-embedded-flagged / gateway-baseline-flagged @c=64"]["value"] == \
        pytest.approx(0.75)


def test_cpu_per_request_divides_server_cpu_by_every_answered_request(sb):
    w = sb.Window(warm_end=1.0, end=2.0)
    for t1 in (0.5, 1.5, 1.6):  # one answer in the warm-up, two measured
        w.record(0.0, t1)
    w.record(0.0, 1.7, RuntimeError("x"))  # failures are not answers
    c = sb.summarise("gateway-embedded", 1, 0, w, 1.0, server_cpu=0.2, client_cpu=0.1, server_cpu_total=0.006)
    assert c.requests == 2 and c.errors == 1 and w.answered == 3
    assert c.cpu_ms_per_request == pytest.approx(2.0) and c.server_cpu_pct == pytest.approx(20.0)
    assert c.loadavg is not None
    assert sb.summarise("ort-direct", 1, 0, w, 1.0, None, 0.1).cpu_ms_per_request is None


def test_ratios_pair_cells_of_the_same_round_and_take_the_median_over_rounds(sb):
    cells = [
        cell(sb, "gateway-triton", 64, 0, rps=100.0), cell(sb, "triton-direct", 64, 0, rps=50.0),   # 2.0
        cell(sb, "gateway-triton", 64, 1, rps=400.0), cell(sb, "triton-direct", 64, 1, rps=100.0),  # 4.0
        cell(sb, "gateway-triton", 64, 2, rps=210.0), cell(sb, "triton-direct", 64, 2, rps=200.0),  # 1.05
        cell(sb, "gateway-triton", 64, 3, rps=999.0),  # its pair is missing: no value for round 3
        cell(sb, "gateway-embedded", 1, 0, p50=1.5), cell(sb, "ort-direct", 1, 0, p50=0.2),
        cell(sb, "gateway-embedded", 1, 1, p50=0.9), cell(sb, "ort-direct", 1, 1, p50=0.1),
    ]
    rat = {r["name"]: r for r in sb.ratios(cells)}
    triton = rat["throughput gateway-triton / triton-direct @c=64"]
    assert triton["per_round"] == [2.0, 4.0, 1.05] and triton["value"] == 2.0  # not 210 / 100 = 2.1 (ratio of medians)
    embedded = rat["gateway-embedded p50 overhead @c=1"]
    assert embedded["per_round"] == pytest.approx([1.3, 0.8]) and embedded["value"] == pytest.approx(1.05)
    assert embedded["met"] is False


def test_ratios_are_none_where_a_target_is_missing_failed_or_had_zero_throughput(sb):
    cells = [
        cell(sb, "ort-direct", 1, p50=0.25),
        cell(sb, "gateway-embedded", 1, p50=math.nan, requests=0),  # no successful request
        cell(sb, "triton-direct", 64, rps=0.0),
        cell(sb, "gateway-triton", 64, rps=500.0),
    ]
    rat = {r["name"]: r for r in sb.ratios(cells)}
    for name in ("gateway-embedded p50 overhead @c=1", "gateway-triton p50 overhead @c=1",
                 "throughput gateway-triton / triton-direct @c=64",
                 "throughput gateway-embedded micro-batching on / off @c=64"):
        assert rat[name]["value"] is None and rat[name]["met"] is None, name


def test_report_names_the_backbone_and_its_latency(sb, tmp_path):
    cells = [cell(sb, "ort-direct", 1, p50=0.25)]
    agg = sb.aggregate(cells)
    meta = {"started": "2026-01-01 00:00:00", "machine": "test", "run_time_s": 1.0, "model": "digits_resnet18",
            "version": 1, "backbone": "resnet18_cifar", "request_shape": [1, 3, 32, 32], "repository": "/r",
            "model_latency_ms": {"1": {"ms": 4.0, "per_sample_ms": 4.0, "min_ms": 3.5},
                                 "64": {"ms": 128.0, "per_sample_ms": 2.0, "min_ms": 120.0}},
            "model_latency_runs": 5, "model_latency_loadavg": 0.5, "cpus": 2, "build": {"backbone": "resnet18_cifar", "epochs": 1, "built": "x",
                                               "seconds": {"total": 90.0, "train": 30.0, "export": 60.0}},
            "duration_s": 1.0, "warmup_s": 0.5, "rounds": 1, "traffic_inputs": 10, "decision_score": "sisome",
            "flagged_share": 0.0, "embedded_batching": "x", "notes": []}
    md = sb.write_report(tmp_path, meta, cells, agg, sb.ratios(cells))
    assert "backbone `resnet18_cifar`, input [1,3,32,32]" in md
    assert "batch 1: 4.00 ms per call" in md and "batch 64: 128.00 ms per call (2.000 ms per sample; best run 120.00 ms)" in md
    assert "1-minute load average 0.50 on 2 cores" in md
    assert "float32 [1,3,32,32] tensors" in md and "28,28" not in md
    assert "| n/a | n/a | <= 1 ms | n/a |" in md  # a missing overhead is "n/a", not "n/a ms"
    assert "server CPU ms/req" in md


def test_grpc_floor_server_answers_every_predict_with_its_response_and_reports_serving(sb, tmp_path):
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from oodguard.serve.v1 import oodguard_pb2 as pb
    from oodguard.serve.v1 import oodguard_pb2_grpc as pb_grpc

    sys.path.insert(0, str(BENCH.parent / "tests"))
    from oodguard.triton_local import free_ports

    answer = pb.PredictResponse(model="digits", version=3, request_id="captured")
    answer.predictions.add(class_index=2, class_name="2", probability=0.9).scores.update({"sisome": 1.5})
    path = tmp_path / "answer.bin"
    path.write_bytes(answer.SerializeToString())
    floor = sb.start_floor_server(free_ports(1)[0], path, tmp_path)
    try:
        floor.wait_ready(timeout_s=30)
        with grpc.insecure_channel(floor.target) as channel:
            stub = pb_grpc.OODGuardStub(channel)
            for request in (pb.PredictRequest(), pb.PredictRequest(model="x", tensor=pb.Tensor(dtype="float32"))):
                assert stub.Predict(request, timeout=10) == answer  # whatever is asked
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            assert status.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        floor.stop()
    assert floor.process.returncode == 0  # SIGTERM: a clean exit


# -- traffic from a real repository -------------------------------------------------------------------
def test_build_traffic_matches_the_model_input(sb, digits_export):
    from oodguard import repository as repo
    from oodguard.onnx_runner import OnnxModel

    repository = digits_export[2]
    traffic = sb.build_traffic(repository, None, count=32)
    model = OnnxModel(repo.version_dir(repository, traffic.model, traffic.version) / repo.MODEL_FILE)
    assert traffic.model == "digits" and traffic.backbone_name == "lenet5"
    assert traffic.inputs.dtype == np.float32 and traffic.inputs.flags["C_CONTIGUOUS"]
    assert 0 < len(traffic.inputs) <= 32
    assert traffic.inputs.shape[1:] == model.input_shape == (1, 28, 28)
    assert traffic.request_shape == [1, 1, 28, 28]
    # the all-flagged traffic: noise the model flags with a margin (every request of it is queued)
    assert traffic.flagged_inputs is not None and traffic.flagged_inputs.shape[1:] == (1, 28, 28)
    scores = model.run(traffic.flagged_inputs)[traffic.decision_score]
    from oodguard.calibration import Calibration
    calibration = Calibration.load(repo.version_dir(repository, traffic.model, traffic.version) / repo.CALIBRATION_FILE)
    assert calibration.thresholds[traffic.decision_score].is_ood(scores).all()
    assert traffic.request(0, flagged=True).tensor.data == traffic.flagged_inputs[0].astype("<f4").tobytes()
    request = traffic.request(3)  # what the gateway targets are sent
    assert (request.model, request.request_id, request.tensor.dtype) == ("digits", "bench-3", "float32")
    assert list(request.tensor.shape) == [1, 1, 28, 28]
    assert np.frombuffer(request.tensor.data, "<f4").tolist() == traffic.inputs[3].ravel().tolist()
    outputs = model.session.run(None, {repo.INPUT_NAME: traffic.inputs[0].reshape(traffic.request_shape)})
    assert outputs[0].shape[0] == 1

    latency = sb.model_latency(model.session, traffic.inputs, batches=(1, 4), runs=2, min_run_s=0.001)
    assert set(latency) == {1, 4}
    assert all(v["ms"] > 0 and len(v["runs_ms"]) == 2 for v in latency.values())
    assert latency[4]["per_sample_ms"] == latency[4]["ms"] / 4
    assert all(v["min_ms"] <= v["ms"] for v in latency.values())
