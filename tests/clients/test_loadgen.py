"""``oodguard loadgen`` against a real gateway: bounded runs, counts, errors by status, flagged share."""

from __future__ import annotations

import asyncio
import json
import threading

import numpy as np
import pytest

from oodguard.cli import main
from oodguard.clients.loadgen import LoadgenConfig, format_report, is_loopback, percentiles, run_loadgen
from oodguard.serve.v1 import oodguard_pb2 as pb

from .test_sdk import Scripted, in_process_server


@pytest.fixture
def gateway(start_gateway, repo_copy):
    return start_gateway(repo_copy)


@pytest.fixture
def id_npz(digits_test_images, tmp_path):
    """Held-out in-distribution digits (classes 0-7) as a .npz dataset spec."""
    images, labels = digits_test_images
    path = tmp_path / "id.npz"
    np.savez(path, images=images, labels=labels)
    return str(path)


def test_counts_and_flagged_share(gateway, id_npz):
    report = asyncio.run(run_loadgen(LoadgenConfig(gateway.target, id_npz, concurrency=4, duration=20, requests=60,
                                                   batch_size=2, ood_fraction=0.5, ood_data="synthetic:uniform:200")))
    assert report["requests"] == report["ok"] == 60 and report["errors"] == {}
    assert report["items"] == 120 and report["model"] == "digits" and report["versions"] == {"digits:1": 60}
    by = report["by_source"]
    assert by["id"]["items"] + by["ood"]["items"] == 120 and by["id"]["items"] > 20 and by["ood"]["items"] > 20
    assert by["ood"]["flagged_share"] > 0.8  # uniform noise: nearly all flagged
    assert by["id"]["flagged_share"] < 0.25  # held-out digits: about the 5% the thresholds allow
    assert report["flagged"] == by["id"]["flagged"] + by["ood"]["flagged"]
    lat = report["latency_ms"]
    assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    assert report["throughput_rps"] > 0 and report["elapsed_s"] < 20
    json.dumps(report)  # JSON-ready


def test_queued_records_trace_back_to_their_dataset_image_and_label(gateway, id_npz):
    asyncio.run(run_loadgen(LoadgenConfig(gateway.target, id_npz, concurrency=2, duration=20, requests=30,
                                          batch_size=3, ood_fraction=0.5, ood_data="synthetic:uniform:50")))
    data = np.load(id_npz)
    records = gateway.gateway.queue.select(state="pending")
    assert len(records) > 30
    from oodguard.calibration import Calibration
    from oodguard.preprocess import Preprocessing

    cal = Calibration.load(gateway.settings.repository / "digits" / "1" / "calibration.json")
    prep = Preprocessing.from_dict(cal.model["preprocessing"])
    traced = {"id": 0, "ood": 0}
    for record in records:
        meta = record.metadata
        assert meta["source"] == "oodguard-loadgen" and meta["set"] in traced
        index = int(meta["indices"].split(",")[record.decision["item"]])
        traced[meta["set"]] += 1
        if meta["set"] == "id":  # an in-distribution digit: its image and its true label
            assert meta["dataset"] == id_npz
            np.testing.assert_allclose(record.input, prep.apply(data["images"][index][None])[0], atol=1e-6)
            assert int(meta["labels"].split(",")[record.decision["item"]]) == int(data["labels"][index])
        else:
            assert meta["dataset"] == "synthetic:uniform:50" and meta["labels"] == "" and 0 <= index < 50
    assert traced["ood"] > 10


def test_duration_and_rate_bound_the_run(gateway):
    report = asyncio.run(run_loadgen(LoadgenConfig(gateway.target, "synthetic:uniform:50", concurrency=3, rate=20,
                                                   duration=1.0)))
    assert 15 <= report["requests"] <= 21 and report["elapsed_s"] < 3
    assert report["flagged_share"] > 0.8 and list(report["by_source"]) == ["id"]


def test_errors_are_counted_by_status(gateway):
    """The gateway goes away mid-run: the calls after that fail UNAVAILABLE and are counted, not retried."""

    def stop():
        gateway.stop(0.2)
        gateway.stop = lambda grace=0: None  # stopped already; the fixture's teardown has nothing left to do

    stopper = threading.Timer(0.7, stop)
    stopper.start()
    try:
        report = asyncio.run(run_loadgen(LoadgenConfig(gateway.target, "synthetic:uniform:50", concurrency=2,
                                                       duration=2.0, timeout=1.0)))
    finally:
        stopper.join()
    assert report["ok"] > 0 and report["errors"].get("UNAVAILABLE", 0) > 0
    assert report["requests"] == report["ok"] + sum(report["errors"].values())
    assert report["error_examples"]["UNAVAILABLE"]


class ScriptedModel(Scripted):
    """:class:`Scripted` ``Predict`` (overloaded first) plus the ``ModelInfo`` of one 28x28 grey model."""

    def ModelInfo(self, request, context):
        spec = pb.InputSpec(max_batch_size=8, preprocessing=pb.Preprocessing(channels=1, height=28, width=28))
        version = pb.VersionInfo(version=1, input=spec)
        return pb.ModelInfoResponse(models=[pb.ModelSpec(name="scripted", versions=[version], latest_version=1)])


def test_overloaded_answers_are_counted_not_retried():
    """Admission control's RESOURCE_EXHAUSTED gets its own count (and example), and loadgen does not retry it."""
    servicer = ScriptedModel(5)
    server, target = in_process_server(servicer)
    try:
        report = asyncio.run(run_loadgen(LoadgenConfig(target, "synthetic:uniform:20", concurrency=2, duration=20,
                                                       requests=12)))
    finally:
        server.stop(0)
    assert report["requests"] == servicer.calls == 12 and report["ok"] == 7
    assert report["errors"] == {"RESOURCE_EXHAUSTED": 5}
    assert report["error_examples"]["RESOURCE_EXHAUSTED"].startswith("overloaded:")
    assert "RESOURCE_EXHAUSTED 5" in format_report(report)


def test_unreachable_gateway_is_an_error(capsys):
    from .conftest import free_port

    assert main(["loadgen", "--target", f"127.0.0.1:{free_port()}", "--data", "digits", "--duration", "1"]) == 2
    assert "cannot reach the gateway" in capsys.readouterr().err


def test_cli_json(gateway, id_npz, capsys):
    code = main(["loadgen", "--target", gateway.target, "--data", id_npz, "--duration", "0.5", "--concurrency", "2",
                 "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["ok"] > 0 and report["ok"] == report["requests"]
    assert report["config"]["concurrency"] == 2 and report["by_source"]["id"]["items"] == report["items"]
    assert main(["loadgen", "--target", gateway.target, "--data", id_npz, "--requests", "3"]) == 0
    assert "throughput" in capsys.readouterr().out


def test_bounds_and_loopback():
    assert is_loopback("127.0.0.1:50051") and is_loopback("localhost:1") and is_loopback("[::1]:5")
    assert not is_loopback("10.1.2.3:50051") and not is_loopback("gateway:50051")
    for bad in (dict(duration=0), dict(duration=7200), dict(concurrency=0), dict(rate=-1), dict(ood_fraction=1.5),
                dict(requests=-1)):
        with pytest.raises(ValueError):
            LoadgenConfig("127.0.0.1:1", "digits", **bad)
    with pytest.raises(ValueError, match="allow-remote"):
        LoadgenConfig("10.1.2.3:50051", "digits")
    LoadgenConfig("10.1.2.3:50051", "digits", allow_remote=True)
    assert main(["loadgen", "--target", "10.1.2.3:50051", "--data", "digits"]) == 2
    assert percentiles([])["p50"] is None and percentiles([0.001, 0.002])["max"] == pytest.approx(2.0)


def test_labels_the_model_does_not_know_are_warned_about_and_reported(gateway, id_npz, capsys):
    """`--data digits` against the digits model (classes 0-7): 8s and 9s would be counted as in-distribution."""
    report = asyncio.run(run_loadgen(LoadgenConfig(gateway.target, "digits", concurrency=2, duration=20, requests=4)))
    unknown = report["id_labels_unknown_to_model"]
    assert set(unknown) == {"8", "9"} and all(n > 150 for n in unknown.values())
    err = capsys.readouterr().err
    assert "loadgen: warning: --data digits holds labels model 'digits' does not know" in err and "'8'" in err
    quiet = asyncio.run(run_loadgen(LoadgenConfig(gateway.target, id_npz, concurrency=2, duration=20, requests=4)))
    assert quiet["id_labels_unknown_to_model"] == {} and "warning" not in capsys.readouterr().err
