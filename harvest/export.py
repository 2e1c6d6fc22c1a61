"""The harvest's output folder: ``images/<id>.png``, ``manifest.jsonl`` and ``tasks.json`` (Label Studio import),
written into a temporary folder renamed into place, so nothing half-written is ever left at ``out_dir``."""

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

from oodguard.preprocess import Preprocessing

from .versions import CalibrationCache

SAFE_NAME = re.compile(r"[^A-Za-z0-9_-]")


@dataclass(frozen=True)
class ExportOptions:
    """How task images are addressed for Label Studio: ``image_url_prefix`` (a web / object-store root serving
    the output folder) or Label Studio's local-files form below ``local_files_root`` (default ``/``)."""

    image_url_prefix: str | None = None
    local_files_root: Path | None = None


def safe_file_name(record_id: str) -> str:
    """A file name from a record id: client-influenced strings never become paths."""
    cleaned = SAFE_NAME.sub("_", record_id)[:100]
    return cleaned or "record"


def to_image(model_input: np.ndarray, preprocessing: Preprocessing) -> Image.Image:
    """A queued model input ``[C,H,W]`` as a PNG-ready image (see :meth:`Preprocessing.invert`)."""
    return Image.fromarray(preprocessing.invert(model_input))


def write_export(records, reasons: dict[str, str], calibrations: CalibrationCache, out_dir: Path, strategy: str,
                 progress: Callable[[str], None], options: ExportOptions = ExportOptions(),
                 extra: dict[str, dict] | None = None) -> None:
    """Write the output folder for ``records``; ``extra`` adds fields to a record's manifest line (e.g. which
    version it was re-scored from)."""
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
                "request_id": record.request_id, "metadata": record.metadata, **(extra or {}).get(record.id, {}),
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
