"""bench/new_class_benchmark.py on a tiny digits holdout: one seed, a few epochs."""

from __future__ import annotations

import argparse
import json

import pytest

from bench_scripts import load_bench
from oodguard.export.scores import registry
from oodguard.export.scores.pvalue_fusion import NEW_CLASS_RULE


@pytest.mark.parametrize("known, unseen", [("0-7", [8, 9]), ("2-9", [0, 1])])
def test_a_digits_holdout_reports_every_score_on_the_unseen_classes(tmp_path, capsys, known, unseen):
    bench = load_bench("new_class_benchmark")
    out = tmp_path / "out"
    assert bench.main(["--holdout", f"digits:{known}", "--seeds", "0", "--epochs", "8", "--out", str(out),
                       "--cache", str(tmp_path / "cache")]) == 0
    report = json.loads((out / "report.json").read_text())
    holdout = report["holdouts"][f"digits-{known}"]
    run = holdout["runs"][0]
    assert run["unseen"] == unseen and run["n_new"] > 300 and run["n_id"] > 100  # ~180 images of each unseen digit
    assert set(run["fused"]["components"]) == set(NEW_CLASS_RULE[0]) and run["fused"]["combination"] == "fisher"
    assert set(run["scores"]) == set(registry()) | {"fused"}
    for figures in run["scores"].values():
        assert all(0 <= figures[k] <= 100 for k in ("auroc", "flagged", "tpr", "fpr_at_95tpr"))
    summary = holdout["summary"]
    best = summary["mean"][summary["best_single"]]["auroc"]
    assert summary["best_single"] != "fused" and best == max(v["auroc"] for n, v in summary["mean"].items() if n != "fused")
    assert summary["fused_minus_best"] == pytest.approx(summary["mean"]["fused"]["auroc"] - best)
    assert summary["auroc_target_met"] == (summary["fused_minus_best"] >= -0.5)
    assert run["scores"]["fused"]["auroc"] > 85  # even 8 epochs: the unseen digits mostly rank above the known
    text = (out / "report.md").read_text()
    assert f"## digits-{known} (unseen classes {unseen})" in text and f"fused - best single ({summary['best_single']})" in text
    assert text.strip() in capsys.readouterr().out
    # a second run reuses the trained model
    assert bench.main(["--holdout", f"digits:{known}", "--seeds", "0", "--epochs", "8", "--out", str(out),
                       "--cache", str(tmp_path / "cache")]) == 0
    assert "using cached run" in capsys.readouterr().out


@pytest.mark.parametrize("text", ["digits", ":0-7", "digits:x"])
def test_a_holdout_is_a_spec_and_the_known_classes(text):
    bench = load_bench("new_class_benchmark")
    with pytest.raises(argparse.ArgumentTypeError, match="SPEC:KNOWN|digits:x"):
        bench.parse_holdout(text)
    assert bench.parse_holdout("/d/mnist/train.gz:0-3,7") == ("/d/mnist/train.gz", [0, 1, 2, 3, 7])
