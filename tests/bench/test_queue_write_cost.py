"""bench/queue_write_cost.py: each alternative writes what it says, and the report carries every figure."""

import json
import uuid

import pytest

from bench_scripts import load_bench


def test_each_cell_writes_its_own_kind_of_ids_and_the_product_function_comes_back(tmp_path):
    bench = load_bench("queue_write_cost")
    from oodguard.queues import base as queue
    from oodguard.queues import sqlite as sqlite_queue

    records = bench.make_records(4)
    assert all(r.decision["thresholds"] is records[0].decision["thresholds"] for r in records)
    for kind, version in (("uuid7", 7), ("uuid4", 4)):
        cell = bench.StoreCell(kind, tmp_path / f"{kind}.sqlite", 10, records)
        cpu, wall = cell.measure(3)
        assert cpu > 0 and wall > 0
        stored = cell.queue.select(limit=100)
        assert len(stored) == 10 + 3 * 4  # the prefill (10, the last put short) and the measured puts
        assert {uuid.UUID(r.id).version for r in stored} == {version}
        assert stored[0].decision == records[0].decision and stored[0].input.shape == (1, 28, 28)
        cell.queue.close()
    assert sqlite_queue.new_record_ids is queue.new_record_ids


def test_one_run_reports_every_part_with_its_ratio(tmp_path, capsys):
    bench = load_bench("queue_write_cost")
    assert bench.main(["--prefill", "50", "--records-per-put", "5", "--puts", "5", "--rounds", "2",
                       "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert all(len(v) == 2 for v in report["per_round"].values())
    med = report["medians"]
    assert med["cpu_ratio"] == pytest.approx(sorted(report["per_round"]["cpu_ratio"])[0] / 2
                                             + sorted(report["per_round"]["cpu_ratio"])[1] / 2)
    assert all(med[k] > 0 for k in ("uuid7_cpu", "uuid4_cpu", "stored_us", "zlib_us", "shared_us", "plain_us"))
    text = (tmp_path / "report.md").read_text()
    assert text in capsys.readouterr().out
    assert text.count("x |") == 4 and "50 records already queued, 5 records per put" in text


def test_bad_arguments_are_refused(capsys):
    bench = load_bench("queue_write_cost")
    with pytest.raises(SystemExit):
        bench.main(["--records-per-put", "0"])
    assert "--records-per-put must be at least 1" in capsys.readouterr().err
