"""The harvest's output folder, written into a temporary folder renamed into place, so nothing half-written is
ever left at ``out_dir``:

* ``images/<id>.png``: each record's model input, undone back to an image;
* ``manifest.jsonl``: one line per record (predicted class, every score, why it was selected, ...);
* ``tasks.json``: Label Studio tasks. ``data.image`` is a URL Label Studio serves (``--image-url-prefix``, or
  its local-files form below ``--local-files-root``); predictions follow Label Studio's convention (``score``:
  the predicted class's probability in [0, 1]); the OOD score (unbounded, higher = more OOD), its name, its
  p-value and ``flagged`` are task data (``data.ood_score``, ...). See :mod:`oodguard.harvest.label_studio`.
* ``label_config.xml``: the labeling configuration for the project (the newest version's classes, ``new class``
  with a name field, ``not relevant``);
* ``labels.json``: the allowed labels, for tools other than Label Studio.

For the local-files form, the Label Studio server needs LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true and
LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT at (or above) ``local_files_root``, and the project a Local Files
storage whose path holds ``<out_dir>/images`` (Label Studio serves a local file only below such a storage's
path; the storage needs no sync: tasks.json is imported as it is).
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

from oodguard import progress as bars
from oodguard.preprocess import Preprocessing

from . import label_studio
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


def newest_class_names(records, calibrations: CalibrationCache) -> tuple[str | None, int | None, list[str]]:
    """(model, version, class names) of the newest version among ``records`` (the labeling choices)."""
    if not records:
        return None, None, []
    newest = max(records, key=lambda r: int(r.version))
    return newest.model, int(newest.version), calibrations.get(newest.model, newest.version).class_names


def p_value(record, calibration, score_name: str, rescored: bool = False) -> float | None:
    """The deciding score's conformal p-value: the gateway's (``decision["p_values"]``), else — and for a record
    re-scored by a newer version, whose stored decision is the old version's — computed from the version's
    calibration scores (the same formula)."""
    stored = ((record.decision or {}).get("p_values") or {}).get(score_name)
    if stored is not None and not rescored:
        return float(stored)
    threshold = calibration.thresholds.get(score_name)
    score = record.scores.get(score_name)
    if threshold is None or score is None or not np.isfinite(score):
        return None
    return float(threshold.p_values(np.asarray([score]))[0])


def write_export(records, reasons: dict[str, str], calibrations: CalibrationCache, out_dir: Path, strategy: str,
                 progress: Callable[[str], None], options: ExportOptions = ExportOptions(),
                 extra: dict[str, dict] | None = None) -> None:
    """Write the output folder for ``records``; ``extra`` adds fields to a record's manifest line (e.g. which
    version it was re-scored from). Image URLs are computed for the final ``out_dir`` (not the staging folder)."""
    out_dir = Path(out_dir).absolute()
    model, version, known = newest_class_names(records, calibrations)
    choices = label_studio.allowed_labels(known)
    final_images = out_dir.resolve() / "images"
    if options.image_url_prefix is None:  # fail before writing anything when the root does not hold out_dir
        label_studio.image_url(final_images / "x.png", None, options.local_files_root)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        (staging / "images").mkdir()
        tasks, lines = [], []
        with bars.bar(len(records), "write images and tasks", "img") as written:
            for n, record in enumerate(records, 1):
                calibration = calibrations.get(record.model, record.version)
                preprocessing = Preprocessing.from_dict(calibration.model["preprocessing"])
                file_name = f"{safe_file_name(record.id)}.png"
                image_name = f"images/{file_name}"
                to_image(record.input, preprocessing).save(staging / image_name)
                predicted = int(np.argmax(record.logits))
                class_name = calibration.class_names[predicted]
                deciding = record.decision.get("deciding") or ["sisome"]
                lines.append(json.dumps({
                    "record_id": record.id, "image": image_name, "model": record.model, "version": record.version,
                    "predicted_class": predicted, "predicted_name": class_name, "flagged": record.flagged,
                    "scores": record.scores, "strategy": strategy, "why": reasons.get(record.id, ""),
                    "request_id": record.request_id, "metadata": record.metadata, **(extra or {}).get(record.id, {}),
                }))
                url = label_studio.image_url(final_images / file_name, options.image_url_prefix,
                                             options.local_files_root)
                more = (extra or {}).get(record.id, {})
                p = p_value(record, calibration, str(deciding[0]), bool(more.get("rescored")))
                tasks.append(label_studio.task(record, calibration.class_names, choices, url, p,
                                               {"why": reasons.get(record.id, ""), **more}))
                written.update(1)
                if n % 1000 == 0:
                    with written.external_write_mode():  # the line goes to stdout: clear the bar, then redraw it
                        progress(f"exported {n}/{len(records)}")
        (staging / "manifest.jsonl").write_text("".join(line + "\n" for line in lines))
        (staging / "tasks.json").write_text(json.dumps(tasks, indent=1, allow_nan=False))
        (staging / "label_config.xml").write_text(label_studio.label_config(known))
        (staging / "labels.json").write_text(json.dumps(label_studio.labels_document(model, version, known), indent=1) + "\n")
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above)
        os.rename(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if options.image_url_prefix is None:
        progress(f"Label Studio: a project with {out_dir / 'label_config.xml'}, a Local Files storage at "
                 f"{final_images} (no sync), then import {out_dir / 'tasks.json'}")
    else:
        progress(f"Label Studio: a project with {out_dir / 'label_config.xml'}; serve {out_dir} at "
                 f"{options.image_url_prefix}, then import {out_dir / 'tasks.json'}")
