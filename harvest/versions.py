"""What harvest knows about the model versions records came from, read from the model repository, and the
pool of one model at one version.

A queue outlives model versions: after a retrain it holds records of v1 and v2, whose logits may differ in
width (v2 added a class), whose features come from different backbones, and whose class index 8 may name
different classes. A pool therefore holds records of **one model at one version**, the *target*: the newest
version of that model in the repository (the one being harvested for). Records of older versions are
*stale*; by default they are **re-scored** with the target version: their stored model input (converted to
the target's input through pixels when the preprocessing changed) runs through the target's ``model.onnx``
(ONNX Runtime, the runner the gateway embeds), so their features, logits and scores are the target's, and
their class indices are the target's class names. ``stale="exclude"`` leaves them out instead; so does a
stale record whose version is no longer in the repository (its preprocessing is unknown). Either way every
record's fate is reported (:class:`PoolPlan`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from oodguard import repository as repo
from oodguard.calibration import Calibration
from oodguard.preprocess import Preprocessing
from oodguard.repository import CALIBRATION_FILE, MODEL_FILE, version_dir

STALE_POLICIES = ("rescore", "exclude")


class CalibrationCache:
    """calibration.json per (model, version), read once from the model repository."""

    def __init__(self, repository: Path):
        self.repository = Path(repository)
        self._cache: dict[tuple[str, int], Calibration] = {}

    def get(self, model: str, version: int) -> Calibration:
        key = (model, int(version))
        if key not in self._cache:
            self._cache[key] = Calibration.load(version_dir(self.repository, model, version) / CALIBRATION_FILE)
        return self._cache[key]

    def has(self, model: str, version: int) -> bool:
        return (version_dir(self.repository, model, version) / CALIBRATION_FILE).is_file()


@dataclass
class PoolPlan:
    """The records of one pool (all of ``model`` at ``version``), and what happened to the others."""

    model: str
    version: int
    records: list  # QueueRecord, stale ones re-scored (their ``version`` is the target's)
    rescored: dict[str, int] = field(default_factory=dict)  # record id -> the version it was queued by
    excluded: dict[str, str] = field(default_factory=dict)  # record id -> why it is not in the pool

    def describe(self) -> str:
        text = f"pool: {len(self.records)} pending records of model {self.model!r} at version {self.version}"
        if self.rescored:
            by = sorted(set(self.rescored.values()))
            text += f" ({len(self.rescored)} re-scored from version(s) {by})"
        if self.excluded:
            text += f"; {len(self.excluded)} excluded ({', '.join(sorted(set(self.excluded.values())))})"
        return text


def choose_model(summary, model: str | None) -> str:
    """The model to harvest: ``model``, or the only model with pending records; clear errors otherwise."""
    pending: dict[str, int] = {}
    for row in summary:
        if row.state == "pending":
            pending[row.model] = pending.get(row.model, 0) + row.count
    listing = ", ".join(f"{m} ({n} pending)" for m, n in sorted(pending.items())) or "none"
    if model is None:
        if len(pending) > 1:
            raise ValueError(f"the queue holds pending records of several models: {listing}; name one with --model")
        if not pending:
            raise ValueError("the queue holds no pending records to harvest")
        return next(iter(pending))
    if model not in pending:
        raise ValueError(f"the queue holds no pending records of model {model!r} (models with pending records: {listing})")
    return model


def plan_pool(records, model: str, repository: Path, calibrations: CalibrationCache, stale: str = "rescore") -> PoolPlan:
    """The pool of ``model``'s pending ``records`` at the newest version in ``repository`` (see the module
    docstring for what happens to records of other versions)."""
    if stale not in STALE_POLICIES:
        raise ValueError(f"stale must be one of {STALE_POLICIES}, got {stale!r}")
    available = repo.versions(repository, model)
    if not available:
        raise ValueError(f"model {model!r} has no version in the repository {repository}; harvest needs its "
                         "calibration.json (class names, preprocessing)")
    target = max(available)
    plan = PoolPlan(model, target, [])
    stale_records = []
    for record in records:
        if record.model != model:
            raise ValueError(f"record {record.id} is of model {record.model!r}, not {model!r}")
        if record.version == target:
            plan.records.append(record)
        elif stale == "exclude":
            plan.excluded[record.id] = f"queued by version {record.version} (--stale exclude)"
        elif not calibrations.has(model, record.version):
            plan.excluded[record.id] = f"queued by version {record.version}, no longer in the repository"
        else:
            stale_records.append(record)
    if stale_records:
        plan.records.extend(rescore(stale_records, calibrations, repository, model, target, plan))
    plan.records.sort(key=lambda r: r.seq)
    return plan


def _target_input(record, source: Preprocessing, target: Preprocessing) -> np.ndarray:
    """The record's model input as the target version's input: as is when the preprocessing is the same,
    else through the pixels (undo the source's normalisation, apply the target's conversion)."""
    if source == target:
        return np.asarray(record.input, np.float32)
    return target.apply(source.invert(record.input)[None])[0]


def rescore(records, calibrations: CalibrationCache, repository: Path, model: str, target: int, plan: PoolPlan) -> list:
    """``records`` run through the target version's ONNX model; copies with its outputs and version."""
    from oodguard.onnx_runner import OnnxModel

    target_cal = calibrations.get(model, target)
    target_prep = Preprocessing.from_dict(target_cal.model["preprocessing"])
    inputs = np.stack([_target_input(r, Preprocessing.from_dict(calibrations.get(model, r.version).model["preprocessing"]),
                                     target_prep) for r in records])
    merged = OnnxModel(version_dir(repository, model, target) / MODEL_FILE).run(inputs)
    score_names = [str(s) for s in target_cal.model["scores"]]
    out = []
    for i, record in enumerate(records):
        plan.rescored[record.id] = record.version
        out.append(replace(record, version=target, input=inputs[i], logits=merged["logits"][i],
                           features=merged["features"][i],
                           scores={n: float(np.asarray(merged[n][i]).reshape(-1)[0]) for n in score_names}))
    return out


__all__ = ["CalibrationCache", "PoolPlan", "choose_model", "plan_pool", "rescore", "STALE_POLICIES"]
