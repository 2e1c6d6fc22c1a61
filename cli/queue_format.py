"""What `oodguard queue` prints: times in UTC, aligned tables, a record's deciding score and predicted class,
everything about a record but its arrays, and counts by state.

Only the actions (:mod:`.queue_actions`, :mod:`.queue_sheet`) import it, once a queue is open: building the
parser imports neither it nor numpy.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone

import numpy as np

from oodguard.queues.base import STATES


def format_time(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def iso_time(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat().replace("+00:00", "Z")


def table(headers: list[str], rows: list[list], right: set[int] = frozenset()) -> str:
    """``rows`` under ``headers`` in aligned columns, those in ``right`` right-aligned."""
    cells = [headers] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[j]) for row in cells) for j in range(len(headers))]

    def line(row: list[str]) -> str:
        return "  ".join(c.rjust(w) if j in right else c.ljust(w) for j, (c, w) in enumerate(zip(row, widths)))

    return "\n".join(line(row).rstrip() for row in cells)


def kind(flagged: bool) -> str:
    return "flagged" if flagged else "sampled"


def deciding_score(record, name: str | None = None) -> tuple[str, float] | None:
    """(name, value) of the score that decided: ``name``, else the first deciding score that crossed its
    threshold (the first deciding score if none did); None when the record holds no such score."""
    if name is None:
        decision = record.decision or {}
        deciding = [str(s) for s in decision.get("deciding") or []]
        crossed = decision.get("crossed")
        hits = [s for s in deciding if crossed is None or s in crossed]
        name = next((s for s in hits + deciding if s in record.scores), None)
    if name is None or name not in record.scores:
        return None
    return name, float(record.scores[name])


def score_text(record, name: str | None = None) -> str:
    score = deciding_score(record, name)
    return "-" if score is None else f"{score[0]}={score[1]:.4g}"


def predicted_class(record) -> int | None:
    """The argmax of the record's logits (None without logits)."""
    logits = np.asarray(record.logits).reshape(-1)
    return int(np.argmax(logits)) if logits.size else None


def record_line(record, score: str | None) -> list:
    """A record's cells in `oodguard queue list`'s table."""
    predicted = predicted_class(record)
    return [record.id, format_time(record.time), record.model, record.version, record.state, kind(record.flagged),
            score_text(record, score), "-" if predicted is None else predicted]


def record_details(r) -> dict:
    """Everything about a record but its arrays (dtype and shape of those)."""
    return {"id": r.id, "model": r.model, "version": r.version, "state": r.state, "flagged": r.flagged,
            "kind": kind(r.flagged), "seq": r.seq, "time": iso_time(r.time), "time_s": r.time,
            "request_id": r.request_id, "metadata": r.metadata, "predicted_class": predicted_class(r),
            "scores": r.scores, "decision": r.decision,
            "arrays": {name: {"dtype": str(np.asarray(a).dtype), "shape": list(np.shape(a))}
                       for name, a in (("input", r.input), ("logits", r.logits), ("features", r.features))}}


def details_text(d: dict) -> str:
    """:func:`record_details` as readable text."""
    arrays = ", ".join(f"{name} {a['dtype']} {tuple(a['shape'])}" for name, a in d["arrays"].items())
    return (f"record {d['id']}\n"
            f"  model {d['model']}, version {d['version']}, state {d['state']}, {d['kind']}, seq {d['seq']}\n"
            f"  time {format_time(d['time_s'])} UTC\n"
            f"  request id {d['request_id'] or '-'}\n"
            f"  metadata {json.dumps(d['metadata'])}\n"
            f"  predicted class {'-' if d['predicted_class'] is None else d['predicted_class']}\n"
            f"  scores {', '.join(f'{k}={v:.6g}' for k, v in d['scores'].items()) or '-'}\n"
            f"  decision {json.dumps(d['decision'])}\n"
            f"  arrays {arrays}")


def by_state(states) -> dict[str, int]:
    """How many of ``states`` are each state."""
    out: dict[str, int] = {}
    for state in states:
        out[state] = out.get(state, 0) + 1
    return out


def counts_text(counts: dict[str, int]) -> str:
    """``{state: count}`` as "3 pending, 1 sent", in the order of the states, zeros left out."""
    return ", ".join(f"{counts[s]} {s}" for s in STATES if counts.get(s))


__all__ = ["format_time", "iso_time", "table", "kind", "deciding_score", "score_text", "predicted_class",
           "record_line", "record_details", "details_text", "by_state", "counts_text"]
