"""Label Studio: what a harvest hands it, and how to read what it gives back.

Harvest side (:func:`label_config`, :func:`allowed_labels`, :func:`image_url`, :func:`task`):

* ``label_config.xml``: an ``Image`` (name ``image``, value ``$image``) and one single, required ``Choices``
  (name ``label``) with a choice per known class of the model version, then ``new class`` (with a ``TextArea``
  named ``new_class``, shown only while ``new class`` is chosen, for the new class's name) and ``not relevant``
  (the record is left out of the dataset).
* A task's ``data.image`` is a URL Label Studio can load: ``<image_url_prefix>/images/<file>``, or Label
  Studio's local-files form ``/data/local-files/?d=<image path below the server's
  LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT>``.
* Predictions follow Label Studio's convention: ``score`` is a confidence in [0, 1] (here the predicted
  class's softmax probability), ``result`` the predicted class as the ``label`` choice, ``model_version``
  ``<model>:v<version>``. The OOD side (``ood_score``: the deciding score, unbounded, higher = more OOD;
  ``ood_score_name``; ``ood_p_value``: its conformal p-value, small = unlike the calibration data;
  ``flagged``) travels in the task's ``data``, so annotators see it and every export keeps it.

Import side (:func:`read_export`): one reader for Label Studio's JSON export (tasks with ``annotations``),
its JSON-MIN export (flat rows: ``record_id``, ``label`` — a string, or ``{"choices": [...]}`` —,
``new_class``, ...), its CSV export (a header naming ``record_id`` and ``label`` among other columns), and a
plain CSV ``record_id,label`` (header optional). The first three come from a configured project: their labels
must be one of its choices. A plain CSV has none: its labels are free text.
"""

from __future__ import annotations

import csv
import io
import json
import math
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from xml.sax.saxutils import quoteattr

import numpy as np

from .strategies.base import softmax

NEW_CLASS = "new class"
NOT_RELEVANT = "not relevant"
SPECIAL = (NEW_CLASS, NOT_RELEVANT)
FROM_NAME, TO_NAME, NEW_CLASS_NAME = "label", "image", "new_class"

LS_JSON, LS_JSON_MIN, LS_CSV, PLAIN_CSV = ("Label Studio JSON", "Label Studio JSON-MIN", "Label Studio CSV",
                                           "plain CSV record_id,label")
CONFIGURED = (LS_JSON, LS_JSON_MIN, LS_CSV)


# ---------------------------------------------------------------------------------------------- harvest side


def allowed_labels(class_names: list[str]) -> list[str]:
    """The labels an annotator may choose: the known classes, ``new class``, ``not relevant``."""
    clash = [name for name in class_names if name in SPECIAL]
    if clash:
        raise ValueError(f"class names {clash} collide with the Label Studio choices {list(SPECIAL)}")
    return [str(name) for name in class_names] + list(SPECIAL)


def label_config(class_names: list[str]) -> str:
    """The labeling configuration (Label Studio's XML) for a model with these class names."""
    choices = "".join(f"    <Choice value={quoteattr(label)}/>\n" for label in allowed_labels(class_names))
    return (
        "<View>\n"
        f'  <Image name="{TO_NAME}" value="${TO_NAME}"/>\n'
        f'  <Header value="Class of this image (the model predicted it; see the task data for its OOD score)"/>\n'
        f'  <Choices name="{FROM_NAME}" toName="{TO_NAME}" choice="single" required="true" showInline="true">\n'
        f"{choices}"
        "  </Choices>\n"
        f'  <View visibleWhen="choice-selected" whenTagName="{FROM_NAME}" whenChoiceValue={quoteattr(NEW_CLASS)}>\n'
        '    <Header value="Name of the new class"/>\n'
        f'    <TextArea name="{NEW_CLASS_NAME}" toName="{TO_NAME}" maxSubmissions="1" rows="1" editable="true"/>\n'
        "  </View>\n"
        "</View>\n"
    )


def labels_document(model: str | None, version: int | None, class_names: list[str]) -> dict:
    """``labels.json``: the allowed labels for tools other than Label Studio."""
    return {"model": model, "version": version, "labels": allowed_labels(class_names),
            "known_classes": [str(c) for c in class_names], "new_class": NEW_CLASS, "not_relevant": NOT_RELEVANT,
            "new_class_name_field": NEW_CLASS_NAME}


def image_url(image_path: Path, image_url_prefix: str | None = None, local_files_root: Path | None = None) -> str:
    """The URL Label Studio loads the image at ``image_path`` (its final, absolute place in the output folder)
    from: ``<image_url_prefix>/images/<file>`` when a prefix is given, else ``/data/local-files/?d=<path
    relative to local_files_root>`` (the server's LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT; default ``/``)."""
    if image_url_prefix:
        return f"{image_url_prefix.rstrip('/')}/images/{urllib.parse.quote(image_path.name)}"
    root = Path(local_files_root or "/").resolve()
    path = Path(image_path).resolve()
    try:
        relative = path.relative_to(root)
    except ValueError:
        raise ValueError(f"{path} is not below the Label Studio local-files root {root}: give --local-files-root "
                         "as the server's LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT (or --image-url-prefix)") from None
    return "/data/local-files/?d=" + urllib.parse.quote(relative.as_posix(), safe="/")


def _finite(value) -> float | None:
    """JSON has no NaN/inf (Label Studio rejects them): those become null."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def task(record, class_names: list[str], choices: list[str], image: str, p_value: float | None,
         data: dict | None = None) -> dict:
    """One Label Studio task for ``record`` (its own version's ``class_names``); the prediction is left out when
    the predicted class is not among the project's ``choices`` (an older version's class)."""
    probabilities = softmax(np.asarray(record.logits)[None])[0]
    predicted = int(np.argmax(probabilities))
    class_name = str(class_names[predicted])
    deciding = (record.decision or {}).get("deciding") or ["sisome"]
    score_name = str(deciding[0])
    task_data = {
        "image": image, "record_id": record.id, "model": record.model, "version": int(record.version),
        "predicted_name": class_name, "confidence": _finite(probabilities[predicted]),
        "ood_score": _finite(record.scores.get(score_name)), "ood_score_name": score_name,
        "ood_p_value": _finite(p_value), "flagged": bool(record.flagged), **(data or {}),
    }
    out = {"data": task_data}
    if class_name in choices:
        out["predictions"] = [{
            "model_version": f"{record.model}:v{record.version}",
            "score": float(probabilities[predicted]),
            "result": [{"from_name": FROM_NAME, "to_name": TO_NAME, "type": "choices",
                        "value": {"choices": [class_name]}}],
        }]
    return out


# ----------------------------------------------------------------------------------------------- import side


@dataclass
class Entry:
    """One labeled record of an export: ``label`` as chosen (a class, ``new class``, ``not relevant``, or a
    plain CSV's free text) and the ``new_class`` text."""

    record_id: str
    label: str
    new_class: str = ""
    where: str = ""  # e.g. "task 12" / "row 5", for error messages
    source: dict | None = field(default=None, repr=False)  # the annotation / row it came from


@dataclass
class LabelExport:
    """What :func:`read_export` found: the format, the labeled records (the chosen annotation per record), and
    how many tasks/rows held no usable annotation (none, or only cancelled ones)."""

    format: str
    entries: dict[str, Entry]
    rows: int
    unlabeled: int = 0
    cancelled: int = 0
    errors: list[str] = field(default_factory=list)
    #: record ids whose annotations (or rows) disagree on the label: the most recent one is kept
    conflicts: list[str] = field(default_factory=list)

    @property
    def configured(self) -> bool:
        """True for Label Studio exports (their labels are choices of the labeling configuration)."""
        return self.format in CONFIGURED


def read_export(path: Path) -> LabelExport:
    """Detect the export's format and read it (see the module docstring); ``ValueError`` for an empty or
    malformed file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not a text file ({exc})") from exc
    if not text.strip():
        raise ValueError(f"{path}: the export is empty")
    if text.lstrip()[:1] in "[{":
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from exc
        except RecursionError:
            raise ValueError(f"{path}: JSON nested too deeply to be a Label Studio export") from None
        if not isinstance(raw, list):
            raise ValueError(f"{path}: a Label Studio JSON / JSON-MIN export is a JSON list of tasks")
        if not raw:
            raise ValueError(f"{path}: the export is empty (a JSON list of no tasks)")
        if not all(isinstance(item, dict) for item in raw):
            raise ValueError(f"{path}: a Label Studio JSON / JSON-MIN export is a list of objects")
        try:
            if any("annotations" in item or isinstance(item.get("data"), dict) for item in raw):
                export = _read_json(raw)
            else:
                export = _read_rows(raw, LS_JSON_MIN, "row")
        except (AttributeError, TypeError) as exc:  # a field of the wrong kind deeper than the checks below reach
            raise ValueError(f"{path}: not a Label Studio export: a field has the wrong type ({exc})") from None
    else:
        try:
            export = _read_csv(text)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
    if export.errors:
        shown = "; ".join(export.errors[:5]) + (f"; ... ({len(export.errors)} in all)" if len(export.errors) > 5 else "")
        raise ValueError(f"{path} ({export.format}): {shown}")
    return export


def _text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, list):  # a TextArea's list of texts
        return " ".join(_text(v) for v in value).strip()
    if isinstance(value, dict):
        return _text(value.get("text", ""))
    return str(value).strip()


def _choice(value, where: str, errors: list[str]) -> str | None:
    """The one chosen label of a JSON-MIN / CSV ``label`` value: a string, ``{"choices": [...]}``, or a JSON
    text of that (CSV)."""
    if isinstance(value, str) and value.lstrip().startswith(("{", "[")):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass
    if isinstance(value, dict):
        value = value.get("choices", [])
    if isinstance(value, list):
        if len(value) > 1:
            errors.append(f"{where}: several choices {value} (the labeling configuration allows one)")
            return None
        value = value[0] if value else ""
    label = "" if value is None else str(value).strip()
    return label or None


def _newest_first(annotations: list[dict]) -> list[dict]:
    def key(a):
        return (str(a.get("updated_at") or a.get("created_at") or ""), _int(a.get("annotation_id", a.get("id"))))
    return sorted(annotations, key=key, reverse=True)


def _int(value) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return -1


def _read_json(tasks: list[dict]) -> LabelExport:
    export = LabelExport(LS_JSON, {}, len(tasks))
    for n, item in enumerate(tasks, 1):
        where = f"task {item.get('id', f'#{n}')}"
        data = item.get("data") or {}
        record_id = str(data.get("record_id") or "").strip() if isinstance(data, dict) else ""
        if not record_id:
            export.errors.append(f"{where} has no data.record_id (not a task of an oodguard harvest)")
            continue
        annotations = item.get("annotations") or []
        if not isinstance(annotations, list):
            export.errors.append(f"{where}: 'annotations' is not a list")
            continue
        annotations = [a for a in annotations if isinstance(a, dict)]
        live = [a for a in annotations if not a.get("was_cancelled")]
        if not live:
            export.unlabeled += 1
            export.cancelled += bool(annotations)
            continue
        annotation = _newest_first(live)[0]
        if len({_first_choice(a) for a in live} - {None}) > 1:
            export.conflicts.append(record_id)
        try:
            chosen, new_class = _annotation_fields(annotation)
        except ValueError as exc:
            export.errors.append(f"{where}: {exc}")
            continue
        where = f"{where} (record {record_id}, annotation {annotation.get('id', '?')})"
        if len(chosen) > 1:
            export.errors.append(f"{where}: several choices {chosen} (the labeling configuration allows one)")
        elif not chosen:
            export.unlabeled += 1
        else:
            _add(export, Entry(record_id, chosen[0].strip(), new_class, where), annotation)
    return export


def _annotation_fields(annotation: dict) -> tuple[list[str], str]:
    """The choices and the "new class" text of a JSON annotation; ValueError naming a field of the wrong type."""
    results = annotation.get("result") or []
    if not isinstance(results, list) or not all(isinstance(r, dict) for r in results):
        raise ValueError("an annotation's 'result' is not a list of objects")
    chosen, new_class = [], ""
    for result in results:
        value = result.get("value") or {}
        if not isinstance(value, dict):
            raise ValueError("a result's 'value' is not an object")
        if result.get("type") == "choices" and result.get("from_name", FROM_NAME) == FROM_NAME:
            chosen.extend(str(c) for c in value.get("choices") or [])
        elif result.get("type") == "textarea" and result.get("from_name", NEW_CLASS_NAME) == NEW_CLASS_NAME:
            new_class = _text(value.get("text"))
    return chosen, new_class


def _first_choice(annotation: dict) -> str | None:
    """The first choice of a JSON annotation (to see annotations of one task disagree); None without one."""
    try:
        chosen, _ = _annotation_fields(annotation)
    except ValueError:
        return None
    return chosen[0].strip() if chosen else None


def _add(export: LabelExport, entry: Entry, row: dict | None) -> None:
    """Keep the most recent annotation per record (rows of several annotations of one task); a record whose
    rows disagree on the label is noted in ``export.conflicts``."""
    previous = export.entries.get(entry.record_id)
    if previous is not None and previous.label != entry.label and entry.record_id not in export.conflicts:
        export.conflicts.append(entry.record_id)
    if previous is not None and row is not None and previous.source is not None:
        if _newest_first([previous.source, row])[0] is previous.source:
            return
    entry.source = row
    export.entries[entry.record_id] = entry


def _read_rows(rows: list[dict], fmt: str, unit: str) -> LabelExport:
    """JSON-MIN rows or CSV-export rows (one per annotation; cancelled ones are marked ``was_cancelled``
    where Label Studio writes it)."""
    export = LabelExport(fmt, {}, len(rows))
    for n, row in enumerate(rows, 1):
        where = f"{unit} {n}" + (f" (task {row['id']})" if row.get("id") not in (None, "") else "")
        record_id = str(row.get("record_id") or "").strip()
        if not record_id:
            export.errors.append(f"{where} has no record_id (not a task of an oodguard harvest)")
            continue
        if str(row.get("was_cancelled", "")).lower() in ("true", "1"):
            export.unlabeled += 1
            export.cancelled += 1
            continue
        label = _choice(row.get(FROM_NAME), f"{where} (record {record_id})", export.errors)
        if label is None:
            export.unlabeled += 1
            continue
        _add(export, Entry(record_id, label, _text(row.get(NEW_CLASS_NAME)), f"{where} (record {record_id})"), row)
    return export


def _read_csv(text: str) -> LabelExport:
    reader = csv.reader(io.StringIO(text))
    try:
        rows = [row for row in reader if any(cell.strip() for cell in row)]
    except csv.Error as exc:  # e.g. a field over the csv module's limit of 131,072 characters
        raise ValueError(f"line {reader.line_num}: not a readable CSV row ({exc})") from None
    if not rows:
        raise ValueError("the export is empty")
    header = [cell.strip() for cell in rows[0]]
    if "record_id" in header and header != ["record_id", "label"]:  # (no "label" column: nothing annotated)
        dicts = [dict(zip(header, row)) for row in rows[1:]]
        if not dicts:
            raise ValueError("the export is empty (a CSV header and no rows)")
        return _read_rows(dicts, LS_CSV, "row")
    if header == ["record_id", "label"]:
        rows = rows[1:]
        if not rows:
            raise ValueError("the export is empty (a CSV header and no rows)")
    export = LabelExport(PLAIN_CSV, {}, len(rows))
    bad = [i for i, row in enumerate(rows, 1) if len(row) != 2 or not row[0].strip() or not row[1].strip()]
    if bad:
        export.errors.append(f"rows {bad[:5]} are not 'record_id,label'")
        return export
    for n, (record_id, label) in enumerate(rows, 1):
        previous = export.entries.get(record_id.strip())
        if previous is not None and previous.label != label.strip() and record_id.strip() not in export.conflicts:
            export.conflicts.append(record_id.strip())  # the last row wins
        export.entries[record_id.strip()] = Entry(record_id.strip(), label.strip(), "", f"row {n}")
    return export
