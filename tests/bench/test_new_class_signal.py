"""bench/new_class_signal.py on the digits demo run: held-out-class AUROC against the true AUROC on digits 8-9."""

from __future__ import annotations

import re

from bench_scripts import load_bench


def test_it_ranks_every_candidate_and_reports_the_correlation(digits_export, capsys):
    bench = load_bench("new_class_signal")
    run = digits_export[3].parent
    assert bench.main(["--run", str(run), "--unknown", "digits", "--classes", "8,9", "--holdouts", "2",
                       "--epochs", "10"]) == 0
    out = capsys.readouterr().out
    held = re.search(r"held out \[(\d+), (\d+)\] in \d+ s; true unknown: digits classes 8,9 \((\d+) images\)", out)
    assert held and int(held.group(3)) > 300  # digits has about 180 images of each of 8 and 9
    rows = re.findall(r"^\s+(\d+\.\d+)\s+(\d+\.\d+)  (fisher|min-p)\(", out, re.M)
    assert len(rows) == 15 and all(0 <= float(a) <= 100 and 0 <= float(b) <= 100 for a, b, _ in rows)
    assert [float(a) for a, _, _ in rows] == sorted((float(a) for a, _, _ in rows), reverse=True)
    assert len(re.findall(r"^\s+\d+\.\d+\s+\d+\.\d+  [a-z]+$", out, re.M)) == 8  # the eight penultimate scores
    assert re.search(r"Spearman correlation of the two rankings: -?\d\.\d\d; best true: ", out)
