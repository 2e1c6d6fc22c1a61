"""`oodguard labels import`: labels from the relabeling tool, joined with the queue, become a dataset.

Reads a Label Studio JSON export (tasks with ``data.record_id`` and an annotation whose first result is a
``choices`` value; cancelled annotations are skipped) or a plain CSV ``record_id,label`` (header optional).
Each labeled record's queued model input is turned back into a uint8 image with its version's recorded
preprocessing. Labels that are not classes of the model either become new classes (``new-classes``,
appended in order of first appearance) or one explicit ``unknown`` class (``unknown``). The result is an
``.npz`` with ``images``, ``labels`` and ``class_names`` that `oodguard train --data` reads.
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .versions import CalibrationCache
from oodguard.preprocess import Preprocessing

POLICIES = ("new-classes", "unknown")
UNKNOWN = "unknown"


@dataclass
class ImportSummary:
    out_path: Path
    n: int
    class_names: list[str]
    new_classes: list[str]
    missing_ids: list[str]


def read_labels(path: Path) -> dict[str, str]:
    path = Path(path)
    text = path.read_text()
    if path.suffix.lower() == ".json":
        try:
            tasks = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from exc
        if not isinstance(tasks, list):
            raise ValueError(f"{path}: a Label Studio export is a JSON list of tasks")
        labels = {}
        for task in tasks:
            record_id = str((task.get("data") or {}).get("record_id", ""))
            for annotation in task.get("annotations") or []:
                if annotation.get("was_cancelled"):
                    continue
                choices = [r["value"]["choices"][0] for r in annotation.get("result") or []
                           if r.get("type") == "choices" and r.get("value", {}).get("choices")]
                if record_id and choices:
                    labels[record_id] = str(choices[0])
                    break
        return labels
    rows = [row for row in csv.reader(text.splitlines()) if row]
    if rows and rows[0][:2] == ["record_id", "label"]:
        rows = rows[1:]
    bad = [i for i, row in enumerate(rows, 1) if len(row) != 2 or not row[0] or not row[1]]
    if bad:
        raise ValueError(f"{path}: rows {bad[:5]} are not 'record_id,label'")
    return {row[0]: row[1] for row in rows}


def import_labels(labels_path: Path, queue, repository: Path, out_path: Path, policy: str = "new-classes") -> ImportSummary:
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; choose from {POLICIES}")
    labels = read_labels(labels_path)
    if not labels:
        raise ValueError(f"{labels_path}: no labels found")
    records = queue.get(list(labels))
    found = {r.id for r in records}
    missing = [i for i in labels if i not in found]
    if not records:
        raise ValueError(f"none of the {len(labels)} labeled record ids is in the queue")
    calibrations = CalibrationCache(repository)
    newest = max(records, key=lambda r: r.version)
    class_names = list(calibrations.get(newest.model, newest.version).class_names)
    new_classes: list[str] = []
    images, targets = [], []
    for record in records:
        label = labels[record.id]
        if label not in class_names:
            label = label if policy == "new-classes" else UNKNOWN
            if label not in class_names:
                class_names.append(label)
                new_classes.append(label)
        preprocessing = Preprocessing.from_dict(calibrations.get(record.model, record.version).model["preprocessing"])
        images.append(preprocessing.invert(record.input))
        targets.append(class_names.index(label))
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".npz", dir=out_path.parent)
    os.close(fd)
    np.savez_compressed(tmp, images=np.stack(images), labels=np.asarray(targets, np.int64),
                        class_names=np.asarray(class_names), record_ids=np.asarray([r.id for r in records]))
    os.replace(tmp, out_path)
    return ImportSummary(out_path, len(records), class_names, new_classes, missing)
