"""The harvest's output folder for Label Studio, on hand-made records (no model, no server): the labeling
configuration, the allowed labels, task image URLs (local files / URL prefix, from the final folder), and
predictions in Label Studio's convention with the OOD side in the task data."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from oodguard.calibration import Calibration, ScoreThreshold
from oodguard.harvest.output_folder import ExportOptions, write_export
from oodguard.harvest.label_studio import NEW_CLASS, NOT_RELEVANT, label_config
from oodguard.queues.base import QueueRecord

PREPROCESSING = {"channels": 1, "height": 4, "width": 4, "mean": [0.5], "std": [0.5]}
CLASSES = {1: ["cat", "dog"], 2: ["cat", "dog", "fox & <hare>"]}


class Calibrations:
    """What write_export reads of CalibrationCache: per (model, version) class names, preprocessing, thresholds."""

    def __init__(self):
        scores = np.linspace(0.0, 1.0, 19)
        threshold = ScoreThreshold("sisome", 0.9, 0.95, len(scores), 18, 0.95, (0.9, 0.99), scores)
        self.calibrations = {
            ("m", v): Calibration(model={"class_names": names, "preprocessing": PREPROCESSING},
                                  thresholds={"sisome": threshold}, data={})
            for v, names in CLASSES.items()}

    def get(self, model, version):
        return self.calibrations[(model, int(version))]


def record(i: int, version: int = 1, logits=(2.0, 0.0), score=0.5, p_values=None) -> QueueRecord:
    decision = {"ood": True, "deciding": ["sisome"]}
    if p_values is not None:
        decision["p_values"] = p_values
    return QueueRecord(model="m", version=version, input=np.zeros((1, 4, 4), np.float32),
                       logits=np.asarray(logits, np.float32), features=np.zeros(3, np.float32),
                       scores={"sisome": score, "energy": -1.0}, decision=decision, flagged=True, id=f"r{i}")


def export(tmp_path, records, options=ExportOptions(), name="out") -> Path:
    out = tmp_path / name
    write_export(records, {r.id: "chosen" for r in records}, Calibrations(), out, "random", lambda line: None, options)
    return out


def test_label_config_is_label_studio_xml_with_every_allowed_label(tmp_path):
    out = export(tmp_path, [record(0), record(1, version=2, logits=(0.0, 0.0, 3.0))])
    view = ET.fromstring((out / "label_config.xml").read_text())
    image = view.find("Image")
    assert image.attrib == {"name": "image", "value": "$image"}
    choices = view.find("Choices")
    assert (choices.get("name"), choices.get("toName"), choices.get("choice"), choices.get("required")) == (
        "label", "image", "single", "true")
    # the newest version's classes (v2), then the two special labels
    assert [c.get("value") for c in choices.findall("Choice")] == CLASSES[2] + [NEW_CLASS, NOT_RELEVANT]
    shown = [v for v in view.iter("View") if v.get("visibleWhen")]
    assert len(shown) == 1 and shown[0].attrib == {"visibleWhen": "choice-selected", "whenTagName": "label",
                                                   "whenChoiceValue": NEW_CLASS}
    assert shown[0].find("TextArea").get("name") == "new_class"
    labels = json.loads((out / "labels.json").read_text())
    assert labels["labels"] == CLASSES[2] + [NEW_CLASS, NOT_RELEVANT]
    assert (labels["model"], labels["version"], labels["known_classes"]) == ("m", 2, CLASSES[2])


def test_class_names_that_are_special_labels_are_refused():
    with pytest.raises(ValueError, match="collide"):
        label_config(["cat", NEW_CLASS])


def test_predictions_follow_label_studio_and_the_ood_side_is_task_data(tmp_path):
    records = [record(0, logits=(2.0, 0.0), score=0.95), record(1, logits=(-1.0, 1.0), score=0.2, p_values={"sisome": 0.5})]
    tasks = json.loads((export(tmp_path, records) / "tasks.json").read_text())
    first, second = tasks
    probability = 1.0 / (1.0 + np.exp(-2.0))  # softmax of (2, 0)
    assert first["predictions"] == [{"model_version": "m:v1", "score": pytest.approx(probability), "result": [
        {"from_name": "label", "to_name": "image", "type": "choices", "value": {"choices": ["cat"]}}]}]
    assert second["predictions"][0]["result"][0]["value"]["choices"] == ["dog"]
    assert all(0.0 <= t["predictions"][0]["score"] <= 1.0 for t in tasks)
    assert first["data"]["record_id"] == "r0" and first["data"]["ood_score"] == pytest.approx(0.95)
    assert first["data"]["ood_score_name"] == "sisome" and first["data"]["flagged"] is True
    # no p-value stored by the gateway: computed from the calibration scores, (1 + #{>= 0.95}) / (n + 1)
    assert first["data"]["ood_p_value"] == pytest.approx((1 + 1) / 20)
    assert second["data"]["ood_p_value"] == 0.5  # the gateway's, as stored


def test_a_nan_score_is_null_and_tasks_are_strict_json(tmp_path):
    tasks_text = (export(tmp_path, [record(0, score=float("nan"))]) / "tasks.json").read_text()
    task = json.loads(tasks_text, parse_constant=lambda c: pytest.fail(f"{c} in tasks.json"))[0]
    assert task["data"]["ood_score"] is None and task["data"]["ood_p_value"] is None


def test_local_files_urls_name_the_final_folder_below_the_root(tmp_path):
    root = tmp_path / "ls-root"
    out = export(tmp_path, [record(0), record(1)], ExportOptions(local_files_root=root), name="ls-root/harvests/h1")
    tasks = json.loads((out / "tasks.json").read_text())
    assert [t["data"]["image"] for t in tasks] == ["/data/local-files/?d=harvests/h1/images/r0.png",
                                                   "/data/local-files/?d=harvests/h1/images/r1.png"]
    assert all((out / "images" / f"r{i}.png").is_file() for i in range(2))
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # the staging folder is gone


def test_local_files_default_root_is_the_filesystem_root(tmp_path):
    out = export(tmp_path, [record(0)], name="with space")
    image = json.loads((out / "tasks.json").read_text())[0]["data"]["image"]
    expected = (out.resolve() / "images" / "r0.png").as_posix().lstrip("/").replace(" ", "%20")
    assert image == f"/data/local-files/?d={expected}"


def test_url_prefix(tmp_path):
    out = export(tmp_path, [record(0)], ExportOptions(image_url_prefix="https://files.example/h1/"))
    assert json.loads((out / "tasks.json").read_text())[0]["data"]["image"] == "https://files.example/h1/images/r0.png"


def test_an_output_folder_outside_the_local_files_root_is_refused_before_writing(tmp_path):
    with pytest.raises(ValueError, match="not below the Label Studio local-files root"):
        export(tmp_path, [record(0)], ExportOptions(local_files_root=tmp_path / "elsewhere"))
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


def test_a_rescored_record_gets_the_p_value_of_the_version_that_scored_it(tmp_path):
    stale = record(0, version=2, logits=(0.0, 0.0, 3.0), score=0.95, p_values={"sisome": 0.9})  # v1's decision
    out = tmp_path / "out"
    write_export([stale], {}, Calibrations(), out, "random", lambda line: None,
                 extra={"r0": {"queued_version": 1, "rescored": True}})
    task = json.loads((out / "tasks.json").read_text())[0]
    assert task["data"]["ood_p_value"] == pytest.approx(0.1) and task["data"]["queued_version"] == 1
    assert task["predictions"][0]["result"][0]["value"]["choices"] == ["fox & <hare>"]
    assert task["predictions"][0]["model_version"] == "m:v2"
