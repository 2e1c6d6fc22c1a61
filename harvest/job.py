"""`oodguard harvest`: pick a label budget from the query queue and export it for relabeling.

Steps: read the pending records; build the pool (features, logits, scores — no re-inference); run the
strategy; claim the chosen ids atomically (a concurrent harvest that claimed some first makes this one
re-select among what is left, so two harvests never send the same record); write
``<out>/images/<id>.png``, ``<out>/manifest.jsonl`` and ``<out>/tasks.json`` (Label Studio import
format) into a temporary folder renamed into place; then mark the records as sent. On any failure the
claimed records are released back to pending, and nothing half-written is left at ``<out>``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from oodguard.calibration import Calibration
from oodguard.preprocess import Preprocessing
from oodguard.repository import CALIBRATION_FILE, version_dir

from .strategies import Context, Pool, get_strategy

SAFE_NAME = re.compile(r"[^A-Za-z0-9_-]")
MAX_ROUNDS = 5


@dataclass
class HarvestResult:
    out_dir: Path
    ids: list[str]
    pool_size: int
    lost_to_others: int


def safe_file_name(record_id: str) -> str:
    """A file name from a record id: client-influenced strings never become paths."""
    cleaned = SAFE_NAME.sub("_", record_id)[:100]
    return cleaned or "record"


def to_image(model_input: np.ndarray, preprocessing: Preprocessing) -> Image.Image:
    """A queued model input ``[C,H,W]`` as a PNG-ready image (see :meth:`Preprocessing.invert`)."""
    return Image.fromarray(preprocessing.invert(model_input))


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


def context_for(records, calibrations: CalibrationCache, params: dict) -> Context:
    """Known classes from the newest version in the pool; held-out ID scores (ALOE's threshold) from its
    calibration file: the sorted calibration scores *are* held-out labeled ID scores."""
    model, version = max(((r.model, r.version) for r in records), key=lambda mv: mv[1])
    calibration = calibrations.get(model, version)
    id_scores = {name: t.sorted_scores for name, t in calibration.thresholds.items()}
    return Context(known_classes=len(calibration.class_names), id_scores=id_scores, params=params)


def run_harvest(queue, strategy: str, budget: int, out_dir: Path, repository: Path, seed: int = 0,
                params: dict | None = None, progress: Callable[[str], None] = print) -> HarvestResult:
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ValueError(f"{out_dir} exists and is not empty; give a new --out folder")
    chooser = get_strategy(strategy)
    records = queue.select(state="pending")
    progress(f"pool: {len(records)} pending records")
    if not records:
        raise ValueError("the queue holds no pending records to harvest")
    calibrations = CalibrationCache(repository)
    context = context_for(records, calibrations, params or {})
    by_id = {r.id: r for r in records}
    reasons: dict[str, str] = {}
    claimed: list[str] = []
    lost = 0
    pool = Pool.from_records(records)
    try:
        for _ in range(MAX_ROUNDS):
            wanted = budget - len(claimed)
            if wanted <= 0 or len(pool) == 0:
                break
            selection = chooser.select(pool, wanted, seed, context)
            chosen = [str(i) for i in selection.ids(pool)]
            progress(f"{strategy}: selected {len(chosen)} of {len(pool)}; claiming")
            got = queue.claim_ids(chosen)
            claimed.extend(got)
            lost += len(chosen) - len(got)
            reasons.update({i: r for i, r in zip(chosen, selection.reasons) if i in set(got)})
            keep = ~np.isin(pool.ids, chosen)  # claimed now, or by another harvest
            pool = pool.subset(np.flatnonzero(keep))
        _export([by_id[i] for i in claimed], reasons, calibrations, out_dir, strategy, progress)
        queue.mark_sent(claimed)
    except BaseException:
        queue.release(claimed)
        raise
    progress(f"harvested {len(claimed)} records into {out_dir}" + (f" ({lost} lost to a concurrent harvest)" if lost else ""))
    return HarvestResult(out_dir, claimed, len(records), lost)


def _export(records, reasons: dict[str, str], calibrations: CalibrationCache, out_dir: Path, strategy: str,
            progress: Callable[[str], None]) -> None:
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        (staging / "images").mkdir()
        tasks, lines = [], []
        for n, record in enumerate(records, 1):
            calibration = calibrations.get(record.model, record.version)
            preprocessing = Preprocessing.from_dict(calibration.model["preprocessing"])
            image_name = f"images/{safe_file_name(record.id)}.png"
            to_image(record.input, preprocessing).save(staging / image_name)
            predicted = int(np.argmax(record.logits))
            class_name = calibration.class_names[predicted]
            deciding = record.decision.get("deciding") or ["sisome"]
            ood_score = float(record.scores.get(deciding[0], np.nan))
            lines.append(json.dumps({
                "record_id": record.id, "image": image_name, "model": record.model, "version": record.version,
                "predicted_class": predicted, "predicted_name": class_name, "flagged": record.flagged,
                "scores": record.scores, "strategy": strategy, "why": reasons.get(record.id, ""),
                "request_id": record.request_id, "metadata": record.metadata,
            }))
            tasks.append({
                "data": {"image": image_name, "record_id": record.id},
                "predictions": [{
                    "model_version": f"{record.model}:{record.version}",
                    "score": ood_score,
                    "result": [{"from_name": "label", "to_name": "image", "type": "choices",
                                "value": {"choices": [class_name]}}],
                }],
            })
            if n % 1000 == 0:
                progress(f"exported {n}/{len(records)}")
        (staging / "manifest.jsonl").write_text("".join(line + "\n" for line in lines))
        (staging / "tasks.json").write_text(json.dumps(tasks, indent=1))
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above)
        os.rename(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
