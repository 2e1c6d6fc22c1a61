"""`oodguard labels import`: labels from the relabeling tool, joined with the queue, become a dataset.

Reads every shape Label Studio exports, and a plain CSV (the format is detected and reported, see
:func:`oodguard.harvest.label_studio.read_export`):

* Label Studio JSON (tasks with ``data.record_id`` and ``annotations``): per task the most recent
  non-cancelled annotation; its ``label`` choice and ``new_class`` text;
* Label Studio JSON-MIN (flat rows: ``record_id``, ``label``, ``new_class``, ...);
* Label Studio CSV (a header naming ``record_id`` and ``label`` among other columns);
* plain CSV ``record_id,label`` (header optional).

A Label Studio export comes from a project configured with the harvest's ``label_config.xml``, so each label
must be one of its choices: a known class of the record's model version; ``new class``, whose name is the
``new_class`` text (an error naming the record when it is empty); or ``not relevant``, left out of the dataset
(and counted; with ``not_relevant_out`` their images go to a second ``.npz``, ``images`` and ``record_ids``,
which ``oodguard train --outlier-data`` trains as an extra class that the saved model drops). Anything else is an error naming the label and the allowed choices. A plain CSV has no
configured choices: labels that are not classes of the model are new classes, as ``new class`` names are.

``policy`` says what new classes become: each its own class (``new-classes``), or one explicit ``unknown`` class
(``unknown``). New classes are appended after the model's in sorted order (natural: ``8`` before ``9`` before
``10``, see :func:`oodguard.datasets.natural_key`), not in the order the export happened to list them, so the same
labels give the same class indices; the summary says which index each got.

Rows naming record ids that are not in the queue are reported in the summary (count and first ids), or are an
error with ``strict``. Each labeled record's queued model input is turned back into a uint8 image with its
version's recorded preprocessing. The result is an ``.npz`` with ``images``, ``labels``, ``class_names`` and
``record_ids`` that `oodguard train --data` reads.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import label_studio
from .label_studio import NEW_CLASS, NOT_RELEVANT, read_export
from .versions import CalibrationCache
from oodguard import progress as bars
from oodguard import repository as repo
from oodguard.datasets import natural_key
from oodguard.files import staged_file
from oodguard.preprocess import Preprocessing

POLICIES = ("new-classes", "unknown")
UNKNOWN = "unknown"
SHOWN = 5
#: labeled record ids read from the queue per query
READ_CHUNK = 500
#: the longest new class name an import accepts (names are stored as a fixed-width array: one long name would
#: make every row that wide) and the most new classes one import may add
MAX_CLASS_NAME_CHARS = 128
MAX_NEW_CLASSES = 1000


@dataclass
class ImportSummary:
    out_path: Path
    n: int
    class_names: list[str]
    new_classes: list[str]
    missing_ids: list[str]  # labeled record ids that are not in the queue
    format: str = ""
    not_relevant: int = 0  # records labeled "not relevant" (left out)
    unlabeled: int = 0  # tasks / rows without a (non-cancelled) label
    rows: int = 0  # tasks / rows in the export
    new_class_counts: dict[str, int] = field(default_factory=dict)
    not_relevant_path: Path | None = None  # where their images were written (None: not asked)
    conflicts: list[str] = field(default_factory=list)  # record ids whose annotations disagreed (newest kept)

    def describe(self) -> str:
        """The summary line `oodguard labels import` prints."""
        parts = [f"read {self.format}: {self.rows} task(s)/row(s)",
                 f"wrote {self.out_path}: {self.n} labeled images, classes {self.class_names}"]
        if self.new_classes:
            first = len(self.class_names) - len(self.new_classes)
            parts.append("new classes, appended in sorted order: " + ", ".join(
                f"{name} → index {first + i}" + (f" ({_images(self.new_class_counts[name])})"
                                                 if name in self.new_class_counts else "")
                for i, name in enumerate(self.new_classes)))
        if self.not_relevant_path is not None:
            parts.append(f"{self.not_relevant} 'not relevant' images written to {self.not_relevant_path} "
                         "(for `oodguard train --outlier-data`)")
        elif self.not_relevant:
            parts.append(f"{self.not_relevant} 'not relevant' left out")
        if self.unlabeled:
            parts.append(f"{self.unlabeled} without a label skipped")
        if self.conflicts:
            parts.append(f"{len(self.conflicts)} record(s) labeled differently by several annotations or rows: the "
                         f"most recent label kept (--strict refuses; first: {', '.join(self.conflicts[:SHOWN])})")
        if self.missing_ids:
            parts.append(f"{len(self.missing_ids)} labeled id(s) not in the queue were skipped "
                         f"(first: {', '.join(self.missing_ids[:SHOWN])})")
        return "; ".join(parts)


def _images(n: int) -> str:
    return f"{n} image" + ("" if n == 1 else "s")


def read_labels(path: Path) -> dict[str, str]:
    """``record id → label`` as written in the export (``new class`` already replaced by its name); for
    quick looks and tests. :func:`import_labels` also checks the labels against the model's classes."""
    export = read_export(path)
    return {i: (e.new_class or e.label) if e.label == NEW_CLASS and export.configured else e.label
            for i, e in export.entries.items()}


def _preview(values: list[str]) -> str:
    return ", ".join(values[:SHOWN]) + (f", ... ({len(values)} in all)" if len(values) > SHOWN else "")


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    """``np.savez_compressed`` to a temporary file in ``path``'s folder, then renamed: never a half-written file."""
    path = Path(path)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:  # a file object: savez would append ".npz" to a name without it
            np.savez_compressed(handle, **arrays)

    os.replace(staged_file(path, write), path)


@dataclass(frozen=True)
class _Imported:
    """What the import keeps of a queue record: its id, model, version and image (the input, unnormalised)."""

    id: str
    model: str
    version: int
    image: np.ndarray


def import_labels(labels_path: Path, queue, repository: Path, out_path: Path, policy: str = "new-classes",
                  strict: bool = False, not_relevant_out: Path | None = None, model: str | None = None) -> ImportSummary:
    """Join an export's labels with the queue's records into a training dataset of one model: ``model`` picks it
    when the export names records of several (a dataset of mixed models would carry one model's class names
    over another's images), and is checked when given."""
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; choose from {POLICIES}")
    export = read_export(labels_path)
    if not export.entries:
        raise ValueError(f"{labels_path} ({export.format}): no labels found: {export.rows} task(s)/row(s), none "
                         "with a label" + (f" ({export.cancelled} only cancelled)" if export.cancelled else ""))
    entries = export.entries
    calibrations = CalibrationCache(repository)
    preprocessings: dict[tuple[str, int], Preprocessing] = {}

    def image_of(record) -> np.ndarray:
        key = (record.model, record.version)
        if key not in preprocessings:
            preprocessings[key] = Preprocessing.from_dict(calibrations.get(*key).model["preprocessing"])
        return preprocessings[key].invert(record.input)

    records = []  # each record as its image: a million records' arrays and scores would not fit in memory
    ids = list(entries)
    with bars.bar(total=len(ids), desc="labels import: read records", unit="record") as progress:
        for start in range(0, len(ids), READ_CHUNK):  # chunks: a bounded statement per read, and a moving bar
            chunk = ids[start:start + READ_CHUNK]
            records.extend(_Imported(r.id, r.model, r.version, image_of(r)) for r in queue.get(chunk))
            progress.update(len(chunk))
    found = {r.id for r in records}
    missing = [i for i in entries if i not in found]
    if missing and strict:
        raise ValueError(f"{labels_path}: {len(missing)} labeled record id(s) are not in the queue: {_preview(missing)}")
    if not records:
        raise ValueError(f"none of the {len(entries)} labeled record ids is in the queue (first: {_preview(missing)})")
    if export.conflicts and strict:
        raise ValueError(f"{labels_path} ({export.format}): {len(export.conflicts)} record(s) labeled differently by "
                         f"several annotations or rows: {_preview(export.conflicts)}")
    models = {name: sum(r.model == name for r in records) for name in sorted({r.model for r in records})}
    if model is not None:
        if model not in models:
            raise ValueError(f"{labels_path}: no labeled record of model {model!r} (its records are of {models})")
        records = [r for r in records if r.model == model]
    elif len(models) > 1:
        raise ValueError(f"{labels_path}: the labeled records are of {len(models)} models ({models}); a dataset is "
                         "of one model: give --model NAME")
    newest = max(records, key=lambda r: r.version)
    harvested_for: dict[str, list[str]] = {}  # model -> class names of its newest version in the repository

    def newest_classes(model: str) -> list[str]:
        if model not in harvested_for:
            available = repo.versions(repository, model)
            harvested_for[model] = list(calibrations.get(model, max(available)).class_names) if available else []
        return harvested_for[model]

    def choices(record) -> list[str]:
        """The classes a record could be labeled with: its own version's, and those of the version the harvest
        was made for (the newest: a re-scored v1 record was offered v2's classes in label_config.xml)."""
        own = calibrations.get(record.model, record.version).class_names
        return list(own) + [name for name in newest_classes(record.model) if name not in own]

    # the dataset's classes start with those of the version harvested for (else the newest record's), in order
    class_names = list(newest_classes(newest.model) or calibrations.get(newest.model, newest.version).class_names)
    images, names, ids = [], [], []  # names: each image's class name (indices are given once all are known)
    errors: list[str] = []
    not_relevant = 0
    outlier_images, outlier_ids = [], []

    for record in bars.track(records, desc="labels import: join labels", unit="record"):
        entry = entries[record.id]
        known = choices(record)
        label = entry.label
        if export.configured:
            if label == NOT_RELEVANT:
                not_relevant += 1
                if not_relevant_out is not None:
                    outlier_images.append(record.image)
                    outlier_ids.append(record.id)
                continue
            if label == NEW_CLASS:
                if not entry.new_class:
                    errors.append(f"{entry.where}: 'new class' without a name (the new_class text is empty)")
                    continue
                label = entry.new_class
            elif label not in known:
                errors.append(f"{entry.where}: label {label!r} is not one of the choices "
                              f"{label_studio.allowed_labels(known)}")
                continue
        # a class of neither the newest version nor the record's own one is new: the policy decides its name
        if label not in class_names and label not in known:
            label = label if policy == "new-classes" else UNKNOWN
        images.append(record.image)
        names.append(label)
        ids.append(record.id)
    if errors:
        raise ValueError(f"{labels_path} ({export.format}): {len(errors)} bad label(s): " + "; ".join(errors[:SHOWN])
                         + (" ..." if len(errors) > SHOWN else ""))
    if not images:
        raise ValueError(f"{labels_path} ({export.format}): no record is left to import "
                         f"({not_relevant} 'not relevant', {len(missing)} not in the queue)")
    # the model's classes keep their indices; the new ones follow in sorted order, whatever order the export had
    new_classes = sorted({name for name in names if name not in class_names}, key=natural_key)
    long = [name for name in new_classes if len(name) > MAX_CLASS_NAME_CHARS]
    if long:
        raise ValueError(f"{labels_path}: {len(long)} new class name(s) longer than {MAX_CLASS_NAME_CHARS} characters "
                         f"(first: {long[0][:40]!r}..., {len(long[0])} characters); shorten them in the export")
    if len(new_classes) > MAX_NEW_CLASSES:
        raise ValueError(f"{labels_path}: {len(new_classes)} new classes in one import, more than {MAX_NEW_CLASSES}; "
                         f"first: {_preview(new_classes)}")
    class_names += new_classes
    index = {name: i for i, name in enumerate(class_names)}
    targets = [index[name] for name in names]
    out_path = Path(out_path)
    save_npz(out_path, images=np.stack(images), labels=np.asarray(targets, np.int64),
             class_names=np.asarray(class_names), record_ids=np.asarray(ids))
    if not_relevant_out is not None:  # written even when empty: a scripted `train --outlier-data` finds it
        blank = np.zeros((0, *images[0].shape), np.uint8)
        save_npz(Path(not_relevant_out), images=np.stack(outlier_images) if outlier_images else blank,
                 record_ids=np.asarray(outlier_ids, dtype=str))
    counts = {name: int(np.sum(np.asarray(targets) == class_names.index(name))) for name in new_classes}
    return ImportSummary(out_path, len(images), class_names, new_classes, missing, export.format, not_relevant,
                         export.unlabeled, export.rows, counts,
                         Path(not_relevant_out) if not_relevant_out is not None else None, export.conflicts)
