"""What the harvest knows from earlier labeling rounds: the features of the records labeled so far, as known
classes and unknowns, for the strategies' :class:`~oodguard.harvest.Context` (the (K+1)-way detector of
lfosa, jsosal and open-quota trains on them; coreset starts from the known ones).

Sources: label exports (every format `oodguard labels import` reads: Label Studio JSON, JSON-MIN and CSV, a
plain CSV ``record_id,label``), joined with the queue by record id — harvested records stay in the queue as
``sent`` with their features until purged. Per labeled record of the pool's model:

- a label (or a ``new class`` name) that is a class of the pool's version → known, that class's index;
- ``not relevant``, a ``new class`` the version does not have, or (plain CSV) any other label → **unknown**:
  the model has no output for it, which is what the (K+1)-th class stands for (``labels import`` leaves
  "not relevant" out of the dataset and turns new classes into classes or ``unknown``; here all of them are
  unknowns of the pool's version).

Records of an older version are re-scored with the pool's version, or excluded, as pool records are
(:func:`~oodguard.harvest.versions.plan_pool`, policy ``stale``); records of other models are ignored; ids
not in the queue (purged) are counted. An id labeled in several files takes the label of the last file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .label_studio import NEW_CLASS, NOT_RELEVANT, read_export
from .versions import CalibrationCache, plan_pool


@dataclass
class LabeledSet:
    features: np.ndarray  # [M, D] labeled known records
    labels: np.ndarray  # [M] their class indices at the pool's version
    unknown_features: np.ndarray  # [U, D] labeled unknown records
    files: int
    missing: int  # labeled ids not in the queue
    excluded: int  # stale records excluded (policy or version gone)

    def describe(self) -> str:
        text = (f"labels: {len(self.labels)} known and {len(self.unknown_features)} unknown labeled records from "
                f"{self.files} file(s)")
        if self.missing:
            text += f"; {self.missing} labeled id(s) no longer in the queue"
        if self.excluded:
            text += f"; {self.excluded} of older versions excluded"
        return text


def resolve(label: str, new_class: str, configured: bool, class_names: Sequence[str]) -> int:
    """The class index of a label at the pool's version, or −1 for unknown (see the module docstring)."""
    if configured and label == NOT_RELEVANT:
        return -1
    name = (new_class or label) if configured and label == NEW_CLASS else label
    return list(class_names).index(name) if name in class_names else -1


def labeled_set(queue, paths: Sequence[Path], model: str, repository: Path, calibrations: CalibrationCache,
                class_names: Sequence[str], stale: str = "rescore") -> LabeledSet:
    labels: dict[str, int] = {}
    for path in paths:
        export = read_export(path)
        labels.update({i: resolve(e.label, e.new_class, export.configured, class_names) for i, e in export.entries.items()})
    found = queue.get(list(labels))
    records = [r for r in found if r.model == model]
    missing = len(labels) - len(found)
    plan = plan_pool(records, model, repository, calibrations, stale) if records else None
    kept = plan.records if plan else []
    dim = len(kept[0].features) if kept else 0
    features = np.array([np.asarray(r.features, np.float32).reshape(-1) for r in kept], np.float32).reshape(-1, dim)
    y = np.array([labels[r.id] for r in kept], np.int64)
    return LabeledSet(features[y >= 0], y[y >= 0], features[y < 0], len(paths), missing,
                      len(plan.excluded) if plan else 0)
