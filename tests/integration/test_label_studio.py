"""Harvest → a real Label Studio → `oodguard labels import`: the project is created from the harvest's
label_config.xml, tasks.json is imported as it is, Label Studio serves the task images (local files), annotations
go in through its REST API, and each of its exports (JSON, JSON-MIN, CSV) comes back as the dataset that was
annotated. The server: tests/label_studio_fixtures.py (``bash scripts/setup_label_studio.sh``)."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest

from harvest.queue_fixture import filled_queue
from oodguard.cli import main
from oodguard.harvest.output_folder import ExportOptions
from oodguard.harvest.job import run_harvest
from oodguard.harvest.label_studio import NEW_CLASS, NOT_RELEVANT

KNOWN = [str(c) for c in range(8)]
PNG = b"\x89PNG\r\n\x1a\n"


def answers_for(record_ids: list[str]) -> tuple[dict[str, list[dict]], dict[str, str]]:
    """What our annotator submits per record (in order: the last non-cancelled one counts), and the dataset
    that must come out of it (record id → class name; 'not relevant' and unlabeled records are left out)."""
    plan: dict[str, list[dict]] = {}
    expected: dict[str, str] = {}
    for n, record_id in enumerate(record_ids):
        if n < 6:
            plan[record_id] = [{"label": KNOWN[n]}]
            expected[record_id] = KNOWN[n]
        elif n < 8:
            name = ("shoe", "letter")[n - 6]
            plan[record_id] = [{"label": NEW_CLASS, "new_class": name}]
            expected[record_id] = name
        elif n == 8:
            plan[record_id] = [{"label": NOT_RELEVANT}]
        elif n == 9:  # relabeled: the more recent annotation counts
            plan[record_id] = [{"label": "2"}, {"label": "5"}]
            expected[record_id] = "5"
        elif n == 10:  # skipped only
            plan[record_id] = [{"cancelled": True}]
        else:  # not annotated
            plan[record_id] = []
    return plan, expected


@pytest.fixture(scope="module")
def relabeled(label_studio, digits_export, tmp_path_factory):
    """A harvest of 12 records annotated in Label Studio and exported in every format. Returns a dict with the
    queue path, repository, expected dataset and the export files by format."""
    work = tmp_path_factory.mktemp("ls-loop")
    queue, truth, repository = filled_queue(digits_export, work / "q.sqlite", per_kind=8)
    out = label_studio.document_root / "harvest-1"
    harvested = run_harvest(queue, "random", 12, out, repository, seed=0,
                            export=ExportOptions(local_files_root=label_studio.document_root))
    queue.close()
    tasks_file = json.loads((out / "tasks.json").read_text())
    project = label_studio.create_project("oodguard harvest-1", (out / "label_config.xml").read_text())
    label_studio.import_tasks(project, tasks_file)
    tasks = label_studio.tasks(project)
    by_record = {t["data"]["record_id"]: t for t in tasks}
    plan, expected = answers_for(harvested.ids)
    for record_id, answers in plan.items():
        for answer in answers:
            label_studio.annotate(by_record[record_id]["id"], answer)
    exports = {}
    for export_type, suffix in (("JSON", "json"), ("JSON_MIN", "json"), ("CSV", "csv")):
        exports[export_type] = work / f"export-{export_type}.{suffix}"
        exports[export_type].write_bytes(label_studio.export(project, export_type))
    return {"queue": f"sqlite:///{work / 'q.sqlite'}", "repository": repository, "out": out, "ids": harvested.ids,
            "tasks": tasks, "tasks_file": tasks_file, "expected": expected, "exports": exports, "work": work,
            "project": project}


def test_label_studio_takes_the_harvest_as_it_is(relabeled, label_studio):
    tasks = relabeled["tasks"]
    assert sorted(t["data"]["record_id"] for t in tasks) == sorted(relabeled["ids"])
    assert all(t["total_predictions"] == 1 for t in tasks)
    for task in tasks:  # Label Studio serves every task image, with the token
        image = task["data"]["image"]
        assert image.startswith("/data/local-files/?d=")
        assert label_studio.get_bytes(image)[:8] == PNG
    # the data annotators see and every export keeps: the OOD side of the record
    for task in relabeled["tasks_file"]:
        assert {"record_id", "ood_score", "ood_score_name", "ood_p_value", "flagged"} <= set(task["data"])
        assert 0.0 <= task["predictions"][0]["score"] <= 1.0
        assert task["predictions"][0]["model_version"] == "digits:v1"
    project = label_studio.api("GET", f"/api/projects/{relabeled['project']}")
    assert 'whenChoiceValue="new class"' in project["label_config"]


def _imported(npz_path) -> dict[str, str]:
    data = np.load(npz_path)
    names = [str(n) for n in data["class_names"]]
    return {str(rid): names[int(label)] for rid, label in zip(data["record_ids"], data["labels"])}


@pytest.mark.parametrize("export_type, found", [("JSON", "Label Studio JSON"), ("JSON_MIN", "Label Studio JSON-MIN"),
                                                ("CSV", "Label Studio CSV")])
def test_every_export_comes_back_as_the_annotated_dataset(relabeled, export_type, found, tmp_path, capsys):
    out = tmp_path / "data.npz"
    assert main(["labels", "import", str(relabeled["exports"][export_type]), "--queue", relabeled["queue"],
                 "--repository", str(relabeled["repository"]), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"read {found}" in printed and "1 'not relevant' left out" in printed
    assert _imported(out) == relabeled["expected"]
    data = np.load(out)
    names = [str(n) for n in data["class_names"]]
    assert names[:8] == KNOWN and sorted(names[8:]) == ["letter", "shoe"]
    assert data["images"].shape == (len(relabeled["expected"]), 28, 28) and data["images"].dtype == np.uint8


def _with_unknown_record(path, export_type, target):
    """The export with one more row/task naming a record id that is not in the queue."""
    text = path.read_text()
    if export_type == "CSV":
        rows = list(csv.DictReader(io.StringIO(text)))
        row = dict(rows[0], record_id="not-in-the-queue", label="1", new_class="")
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows + [row])
        target.write_text(buffer.getvalue())
    else:
        items = json.loads(text)
        extra = json.loads(json.dumps(items[0]))
        if export_type == "JSON":
            extra["data"]["record_id"] = "not-in-the-queue"
        else:
            extra["record_id"], extra["label"] = "not-in-the-queue", "1"
        target.write_text(json.dumps(items + [extra]))
    return target


@pytest.mark.parametrize("export_type", ["JSON", "JSON_MIN", "CSV"])
def test_rows_of_records_not_in_the_queue_are_reported(relabeled, export_type, tmp_path, capsys):
    path = _with_unknown_record(relabeled["exports"][export_type], export_type,
                                tmp_path / relabeled["exports"][export_type].name)
    args = ["labels", "import", str(path), "--queue", relabeled["queue"], "--repository", str(relabeled["repository"]),
            "--out", str(tmp_path / "data.npz")]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "1 labeled id(s) not in the queue were skipped (first: not-in-the-queue)" in printed
    assert _imported(tmp_path / "data.npz") == relabeled["expected"]
    assert main(args + ["--strict", "--out", str(tmp_path / "strict.npz")]) == 2
    assert "not in the queue: not-in-the-queue" in capsys.readouterr().err
    assert not (tmp_path / "strict.npz").exists()
