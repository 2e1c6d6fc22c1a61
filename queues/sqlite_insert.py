"""The SQLite queue's put transaction: the batches of one group commit inserted in order, each within the
queue's bounds and full policy as if alone, with the idempotency check.

Bounds: the bound on records (``max_size``) needs the unharvested count, a scan of the state index whose cost
grows with the queue (figures: docs/benchmarks.md, "sqlite: the put transaction"). A transaction reads it once
and carries it to its connection's next put while ``PRAGMA data_version`` says no other connection (worker,
process) committed in between and this connection wrote nothing else; otherwise it counts again
(:func:`insert_all`).

Idempotency (:mod:`oodguard.queues.base`): a put's transaction reads, in one SELECT, the records stored within
``idempotency_window_s`` whose request rows carry the request ids of its runs (:func:`request_runs`), and
takes a run for a retry when every record of it finds a record of the same model, item position and packed
input among them or among the records this transaction stored before it (the latest such record per item).

Few statements: every statement step releases the GIL and takes it back, and in a gateway whose event loop
holds the GIL each take-back is a forced thread switch. So a transaction reads what it needs in one SELECT
(and one more for the idempotency check when a batch has request ids), inserts a batch's rows by multi-row
statements (:func:`insert_many`) and updates the counters in one UPDATE, whatever the number of batches.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass, field
from typing import Sequence

from .base import PENDING, SENT, RequestRun
from .codec import request_bytes
from .sqlite_schema import drop_orphans

#: rows per multi-row INSERT (15 parameters a record row: far below SQLite's 32766 parameters per statement)
INSERT_CHUNK = 256

#: (model, request id) -> item position -> (record id, packed input): what a retry of a request is matched against
Known = dict[tuple[str, str], dict[int, tuple[str, bytes]]]


@dataclass(frozen=True)
class Bounds:
    """What a put may store: at most ``max_size`` unharvested records and ``max_bytes`` of them; a full queue
    rejects new records or evicts the oldest pending ones (``full_policy``); retries are matched within
    ``idempotency_window_s`` (0: no check)."""

    max_size: int
    max_bytes: int
    full_policy: str
    idempotency_window_s: float = 0.0


@dataclass
class InsertState:
    """What one transaction's inserts carry from batch to batch: the unharvested records and bytes, the next
    request ref, the counts the counters table gets at the end, and for the idempotency check the records of
    the runs' request ids (read at the start, then each record stored) and the ids evicted since."""

    size: int
    used: int
    next_ref: int
    known: Known = field(default_factory=dict)
    gone: set[str] = field(default_factory=set)
    accepted: int = 0
    rejected: int = 0
    evicted: int = 0


class Batch:
    """One ``put`` call's rows waiting for a group commit, and its outcome."""

    def __init__(self, rows: list[tuple], sizes: list[int], refs: list[int | None], requests: list[tuple[str, str]],
                 runs: list[RequestRun], stored: float):
        self.rows = rows  # (id, time, model, version, flagged, input, logits, features, scores, decision)
        self.sizes = sizes  # each row's bytes, its request not included
        self.refs = refs  # each row's index into requests, or None
        self.requests = requests
        self.runs = runs  # the requests that may be retries (none with the idempotency check off)
        self.stored = stored  # when prepared: the request rows' stored time
        self.done = False
        self.result: list[str | None] = []
        self.evicted: list[str] = []  # ids of records this batch evicted
        self.refused: list[str] = []  # request ids of the records it refused
        self.error: BaseException | None = None


def insert_many(db: sqlite3.Connection, head: str, values: str, rows: Sequence[tuple]) -> None:
    """``head`` + ``values`` repeated, :data:`INSERT_CHUNK` rows per statement. Python's sqlite3 releases the GIL
    around every step, and ``executemany`` steps once per row: in a gateway whose event loop is busy, every
    release is a hand-off to the loop and back, so a micro-batch's records go in a few statements, not one per
    row (figures: docs/benchmarks.md, "sqlite: the put transaction")."""
    for start in range(0, len(rows), INSERT_CHUNK):
        chunk = rows[start:start + INSERT_CHUNK]
        db.execute(head + ", ".join([values] * len(chunk)), [v for row in chunk for v in row])


def insert_all(db: sqlite3.Connection, batches: list[Batch], bounds: Bounds,
               counted: tuple[int, int] | None = None) -> tuple[list[list[str | None]], tuple[int, int]]:
    """Every batch's rows, in order, in the caller's IMMEDIATE transaction; per batch its ids, and
    (data_version, the unharvested records after them) for the next put.

    ``counted`` is what this connection's previous put left; ``PRAGMA data_version`` changes exactly when
    another connection (another worker, a harvest) committed since, so an unchanged version means the count is
    still exact, as every other write of this connection clears it (:meth:`SQLiteQueue._write`). Read inside
    this IMMEDIATE transaction, no other writer can commit between the check and the commit."""
    version, used, top_ref = db.execute(
        "SELECT (SELECT data_version FROM pragma_data_version), (SELECT value FROM counters WHERE name = 'bytes'), "
        "(SELECT COALESCE(MAX(ref), 0) FROM requests)").fetchone()
    if counted is not None and counted[0] == version:
        size = counted[1]
    else:
        size = db.execute("SELECT COUNT(*) FROM records WHERE state != ?", (SENT,)).fetchone()[0]
    known = recent(db, {run.request_id for batch in batches for run in batch.runs}, bounds.idempotency_window_s)
    state = InsertState(size, used, top_ref + 1, known)
    results = [insert_batch(db, batch, state, bounds) for batch in batches]
    added = {"accepted": state.accepted, "rejected": state.rejected, "evicted": state.evicted,
             "bytes": state.used - used}
    if any(added.values()):
        db.execute("UPDATE counters SET value = value + CASE name WHEN 'accepted' THEN ? WHEN 'rejected' THEN ? "
                   "WHEN 'evicted' THEN ? ELSE ? END WHERE name IN ('accepted', 'rejected', 'evicted', 'bytes')",
                   (added["accepted"], added["rejected"], added["evicted"], added["bytes"]))
    return results, (version, state.size)


def recent(db: sqlite3.Connection, request_ids: set[str], window_s: float) -> Known:
    """The records stored within the last ``window_s`` seconds under these request ids that carry an item
    position, by (model, request id) and item (the latest per item)."""
    known: Known = {}
    since = time.time() - window_s
    ordered = sorted(request_ids)
    for start in range(0, len(ordered), 500):  # within SQLite's limit on parameters
        chunk = ordered[start:start + 500]
        marks = ",".join("?" * len(chunk))
        for request_id, model, item, rid, packed in db.execute(
                "SELECT q.request_id, r.model, json_extract(r.decision, '$.item'), r.id, r.input FROM requests q "
                f"JOIN records r ON r.request_ref = q.ref WHERE q.request_id IN ({marks}) AND q.stored >= ? "
                "AND json_type(r.decision, '$.item') = 'integer' ORDER BY r.seq", [*chunk, since]):
            known.setdefault((model, request_id), {})[item] = (rid, packed)
    return known


def earlier(run: RequestRun, rows: list[tuple], state: InsertState) -> list[str] | None:
    """The ids of the records an earlier copy of ``run`` stored, item for item, or None if it is no retry
    (an item position or input without a match, or a match evicted in this transaction)."""
    known = state.known.get((run.model, run.request_id), {})
    ids = []
    for item, row in zip(run.items, rows[run.start:run.stop]):
        match = known.get(item) if item is not None else None
        if match is None or match[0] in state.gone or match[1] != row[5]:
            return None
        ids.append(match[0])
    return ids


def insert_batch(db: sqlite3.Connection, batch: Batch, state: InsertState, bounds: Bounds) -> list[str | None]:
    """Insert one ``put`` call's rows within both bounds (applying the full-queue policy), ``state`` holding
    the unharvested records and bytes before it (updated here); their ids. The rows are decided one by one,
    then inserted by multi-row statements (:func:`insert_many`; request rows get their refs here, above the
    largest one: no other writer runs inside this IMMEDIATE transaction). Eviction takes the oldest pending
    records stored before this batch (its own rows are inserted after the decisions). The rows of a retried
    request are not inserted: they get the ids of its earlier records (:func:`earlier`)."""
    size, used = state.size, state.used
    stored: dict[int, int] = {}  # index into batch.requests -> its requests.ref
    request_rows: list[tuple] = []
    record_rows: list[tuple] = []
    out: list[str | None] = []
    runs = {run.start: run for run in batch.runs}
    run: RequestRun | None = None
    repeated: dict[int, str] = {}  # row index -> the id of its earlier copy
    for j, (row, nbytes, ref) in enumerate(zip(batch.rows, batch.sizes, batch.refs)):
        if j in runs:
            run = runs[j]
            repeated.update(zip(range(run.start, run.stop), earlier(run, batch.rows, state) or []))
        elif run is not None and j >= run.stop:
            run = None
        if j in repeated:
            out.append(repeated[j])
            continue
        if ref is not None and ref not in stored:
            nbytes += request_bytes(batch.requests[ref])  # the first record stored carries its request row
        if bounds.full_policy == "evict-oldest" and nbytes <= bounds.max_bytes:
            while size >= bounds.max_size or used + nbytes > bounds.max_bytes:
                victim = db.execute("SELECT seq, id, bytes, request_ref FROM records WHERE state = ? "
                                    "ORDER BY seq LIMIT 1", (PENDING,)).fetchone()
                if victim is None:
                    break
                db.execute("DELETE FROM records WHERE seq = ?", (victim[0],))
                drop_orphans(db, [victim[3]])
                size, used = size - 1, used - victim[2]
                batch.evicted.append(victim[1])
                state.gone.add(victim[1])
        if size >= bounds.max_size or used + nbytes > bounds.max_bytes:
            out.append(None)
            batch.refused.append(batch.requests[ref][0] if ref is not None else "")
            continue
        if ref is not None and ref not in stored:
            stored[ref] = state.next_ref
            state.next_ref += 1
            request_rows.append((stored[ref], *batch.requests[ref], batch.stored))
        record_rows.append((*row, PENDING, stored.get(ref), nbytes))
        size, used = size + 1, used + nbytes
        out.append(row[0])
        if run is not None and run.items[j - run.start] is not None:  # what a later copy of its request finds
            state.known.setdefault((run.model, run.request_id), {})[run.items[j - run.start]] = (row[0], row[5])
    insert_many(db, "INSERT INTO requests (ref, request_id, metadata, stored) VALUES ", "(?, ?, ?, ?)", request_rows)
    insert_many(db, "INSERT INTO records (id, time, model, version, flagged, input, logits, features, scores, "
                    "decision, state, request_id, metadata, request_ref, bytes) VALUES ",
                "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, '', '{}', ?, ?)", record_rows)
    state.size, state.used = size, used
    state.accepted += len(record_rows)
    state.rejected += out.count(None)
    state.evicted += len(batch.evicted)
    return out


__all__ = ["INSERT_CHUNK", "Known", "Bounds", "InsertState", "Batch", "insert_many", "insert_all", "recent", "earlier",
           "insert_batch"]
