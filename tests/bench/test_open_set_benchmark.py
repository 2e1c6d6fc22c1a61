"""Smoke test of bench/open_set_benchmark.py: one round of the closed loop (train → fused scores → SQLite
queue → run_harvest → oracle → retrain) on a tiny pool of real MNIST / Fashion-MNIST images."""

import importlib.util
import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"


def load_benchmark():
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("open_set_benchmark", BENCH / "open_set_benchmark.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["open_set_benchmark"] = module
    spec.loader.exec_module(module)
    return module


def test_one_round_on_a_tiny_pool_writes_a_consistent_report(shared_data, tmp_path):
    bench = load_benchmark()
    out = tmp_path / "report"
    report = bench.main([
        "--data", str(shared_data), "--out", str(out), "--strategies", "random", "--seeds", "1", "--rounds", "1",
        "--budget", "20", "--pool-known", "300", "--pool-mnist-unknown", "150", "--pool-fashion", "150",
        "--calibration-per-class", "10", "--test-size", "1000", "--steps", "150", "--workers", "1",
    ])
    assert {p.name for p in out.iterdir()} >= {"report.md", "report.json", "open_set.png", "work"}
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(report))
    assert report["protocol"]["strategies"] == ["random"] and report["protocol"]["seeds"] == [0]
    [run] = report["runs"]
    assert [r["round"] for r in run["rounds"]] == [0, 1]
    assert [r["labels"] for r in run["rounds"]] == [60, 80]
    last = run["rounds"][-1]
    assert last["known_picked"] + last["unknown_picked"] == 20
    assert 0.0 <= last["precision"] <= 1.0 and 0.0 <= last["recall"] <= 1.0
    assert last["recall"] == last["known_picked"] / 300
    assert 0 <= last["discovered"] <= 14 and len(run["discovered"]) == last["discovered"]
    assert sum(run["known_per_class"]) == 60 + last["known_picked"]
    assert all(r["accuracy"] > 0.5 for r in run["rounds"])
    [row] = report["summary"]
    assert row["strategy"] == "random" and row["accuracy_mean"] > 50.0
    assert 0.0 <= row["precision_mean"] <= 1.0 and 0.0 <= row["recall_mean"] <= 1.0
    # the harvest went through the real queue and exported what a labeling tool imports
    harvest = out / "work" / "seed0" / "random" / "harvest-round0"
    assert len((harvest / "manifest.jsonl").read_text().splitlines()) == 20
    assert len(json.loads((harvest / "tasks.json").read_text())) == 20
    assert len(list((harvest / "images").glob("*.png"))) == 20
    assert "| random |" in (out / "report.md").read_text()
