import json

import numpy as np
import pytest

from oodguard.cli import main
from oodguard.datasets import load_dataset
from oodguard.harvest.job import run_harvest
from oodguard.harvest.labels import import_labels, read_labels

from .queue_fixture import filled_queue


def test_label_studio_export_and_csv_are_read(tmp_path):
    export = [
        {"data": {"record_id": "a"}, "annotations": [{"result": [{"type": "choices", "value": {"choices": ["3"]}}]}]},
        {"data": {"record_id": "b"}, "annotations": [{"was_cancelled": True, "result": [
            {"type": "choices", "value": {"choices": ["4"]}}]}]},
        {"data": {"record_id": "c"}, "annotations": []},
    ]
    (tmp_path / "export.json").write_text(json.dumps(export))
    assert read_labels(tmp_path / "export.json") == {"a": "3"}
    (tmp_path / "labels.csv").write_text("record_id,label\na,3\nb,shoe\n")
    assert read_labels(tmp_path / "labels.csv") == {"a": "3", "b": "shoe"}
    (tmp_path / "bad.csv").write_text("a,3,extra\n")
    with pytest.raises(ValueError, match="record_id,label"):
        read_labels(tmp_path / "bad.csv")


@pytest.mark.parametrize("policy, expected_new", [("new-classes", ["8", "9", "noise"]), ("unknown", ["unknown"])])
def test_import_joins_the_queue_and_extends_the_classes(digits_export, tmp_path, policy, expected_new):
    queue, truth, repository = filled_queue(digits_export, tmp_path / "q.sqlite", per_kind=10)
    harvested = run_harvest(queue, "random", 30, tmp_path / "out", repository, progress=lambda line: None)
    records = {r.id: r for r in queue.get(harvested.ids)}
    lines = ["record_id,label"]
    for record_id in harvested.ids:
        kind = truth[record_id]
        index = int(records[record_id].request_id.split("-")[1])
        label = {"known": str(int(np.argmax(records[record_id].logits))), "unknown": "8" if index % 2 else "9",
                 "noise": "noise"}[kind]
        lines.append(f"{record_id},{label}")
    lines.append("not-in-queue,3")
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    summary = import_labels(tmp_path / "labels.csv", queue, repository, tmp_path / "data.npz", policy)
    assert summary.n == 30 and summary.missing_ids == ["not-in-queue"]
    assert sorted(summary.new_classes) == sorted(expected_new)
    data = load_dataset(str(tmp_path / "data.npz"))
    assert data.images.shape == (30, 28, 28) and data.images.dtype == np.uint8
    assert data.class_names == [str(c) for c in range(8)] + summary.new_classes
    assert set(data.labels.tolist()) <= set(range(len(data.class_names)))


def test_labels_import_command_and_train_accept_the_dataset(digits_export, tmp_path, capsys):
    queue, truth, repository = filled_queue(digits_export, tmp_path / "q.sqlite", per_kind=20)
    harvested = run_harvest(queue, "random", 60, tmp_path / "out", repository, progress=lambda line: None)
    (tmp_path / "labels.csv").write_text("".join(f"{i},{truth[i]}\n" for i in harvested.ids))
    queue.close()
    assert main(["labels", "import", str(tmp_path / "labels.csv"), "--queue", f"sqlite:///{tmp_path / 'q.sqlite'}",
                 "--repository", str(repository), "--out", str(tmp_path / "data.npz")]) == 0
    assert "60 labeled images" in capsys.readouterr().out
    assert main(["train", "--data", str(tmp_path / "data.npz"), "--epochs", "1", "--out", str(tmp_path / "retrain")]) == 0
    record = json.loads((tmp_path / "retrain" / "training.json").read_text())
    assert record["class_names"][-3:] == ["known", "unknown", "noise"]
