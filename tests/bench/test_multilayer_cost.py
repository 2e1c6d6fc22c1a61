"""bench/multilayer_cost.py and bench/cost.py: the cost graphs are what the exports ship (smoke run, LeNet-5)."""

import onnx

from bench_scripts import load_bench


def test_one_interleaved_run_reports_every_head_and_the_load(tmp_path, capsys):
    multilayer_cost = load_bench("multilayer_cost")
    code = multilayer_cost.main(["--backbones", "LeNet-5", "--bank-size", "200", "--multi-layer-bank-size", "100",
                                 "--batches", "1,4", "--seconds", "0", "--min-rounds", "2", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0 and "load average before" in out and "load average after" in out
    assert "bank 200 (multi-layer scores: 100)" in out
    assert "thread CPU time" in out and "wall time" in out
    rows = [line for line in out.splitlines() if line.startswith("| LeNet-5 | ") and line.count("x |") == 4]
    assert [row.split(" | ")[1] for row in rows] == ["1", "4", "1", "4"]  # CPU-time table, then wall-time
    outputs = {name: [o.name for o in onnx.load(str(tmp_path / f"lenet-5-{name}.onnx")).graph.output]
               for name in ("default", "default-multilayer", "multilayer-head")}
    assert "sisom_ml" not in outputs["default"] and "knn" in outputs["default"]
    assert {"sisom_ml", "sisome_ml", "knn"} <= set(outputs["default-multilayer"])
    assert outputs["multilayer-head"] == ["logits", "features", "sisom_ml", "sisome_ml"]
