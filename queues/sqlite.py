"""The query queue in one SQLite file (WAL, ``synchronous=FULL``: a committed put survives a crash).

Layout:

- ``records``: one row per item, ``seq`` (insertion order), ``id``, ``state``, ``flagged``, model, version,
  time; the arrays (model input, logits, features) packed by :func:`pack_array` (:mod:`oodguard.queues.codec`); scores and decision as JSON text; ``bytes``: what the record counts
  towards ``max_bytes`` (see below); ``request_ref``: the ``requests`` row holding its request id and
  metadata. Columns ``request_id`` / ``metadata`` hold them inline only in rows written before request rows
  existed (``request_ref`` NULL); newer rows write ``''`` / ``'{}'`` there (also for a record with neither,
  which gets no request row).
- ``requests``: ``ref``, ``request_id``, ``metadata`` (JSON), ``stored`` (when its ``put`` ran, seconds since
  the epoch; NULL in rows written before the column existed): one row per request of a ``put``, shared by its
  records, deleted with the last record that references it.
- ``counters``: accepted, rejected, evicted (events, they survive restarts) and ``bytes``: the running sum of
  ``records.bytes`` over unharvested (pending + claimed) rows, updated in the transaction that changes it.
- indexes ``records_state_seq`` (state, seq): oldest-first reads of one state; ``records_model_state_seq``
  (model, state, seq): the same for one model (:meth:`SQLiteQueue.select` with ``model``); ``records_group``
  (model, version, state, flagged, time): :meth:`SQLiteQueue.summary` reads only this index (no row, no array);
  ``requests_request_id`` (request_id, stored): the records of a request id stored within the idempotency window.

Bytes of a record: its packed arrays + scores and decision JSON (+ the inline request of an older row); the
first record of a request that is stored also carries the request row's bytes (request id + metadata JSON),
so a request row counts once. A file of the first layout (no ``request_ref`` / ``bytes``) is upgraded in
place when opened (:data:`UPGRADE`, then :data:`REQUESTS_STORED` and :data:`INDEXES`); a fresh file is made the
same way.

Idempotency (:mod:`oodguard.queues.base`): a put's transaction reads, in one SELECT, the records stored within
``idempotency_window_s`` whose request rows carry the request ids of its runs (:func:`request_runs`), and
takes a run for a retry when every record of it finds a record of the same model, item position and packed
input among them or among the records this transaction stored before it (the latest such record per item).

The bound on records (``max_size``) needs the unharvested count, a scan of the state index whose cost grows
with the queue (about 1.5 ms at 30,000 records, 4 ms at 100,000). A put reads it once and carries it to its
connection's next put while ``PRAGMA data_version`` says no other connection (worker, process) committed in
between and this connection wrote nothing else; otherwise it counts again (:meth:`SQLiteQueue._insert_all`).

``SQLiteQueue(path, create=False)`` opens an existing file only (:class:`FileNotFoundError` otherwise): the
commands that read a queue never leave an empty file (or its folder) behind.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence
from urllib.parse import quote

from .base import (CLAIMED, DEFAULT_MAX_BYTES, PENDING, SENT, STATES, DropLog, LocalQueueState, NewRecord,
                   QueryQueue, QueueError, QueueRecord, QueueStats, RequestRun, SummaryRow, check_bounds, decisions_json,
                   new_record_ids, request_runs)
from .codec import group_requests, pack_array, request_bytes, unpack_array

log = logging.getLogger("oodguard.queues.sqlite")


# The first layout; :data:`UPGRADE` brings it (old files and fresh ones alike) to the current one.
SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    id         TEXT NOT NULL UNIQUE,
    time       REAL NOT NULL,
    model      TEXT NOT NULL,
    version    INTEGER NOT NULL,
    flagged    INTEGER NOT NULL,
    state      TEXT NOT NULL,
    input      BLOB NOT NULL,
    logits     BLOB NOT NULL,
    features   BLOB NOT NULL,
    scores     TEXT NOT NULL,
    decision   TEXT NOT NULL,
    request_id TEXT NOT NULL,
    metadata   TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS records_state_seq ON records (state, seq);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO counters VALUES ('accepted', 0), ('rejected', 0), ('evicted', 0);
"""

# Run once, in one transaction, on a file whose records have no request_ref column yet.
UPGRADE = (
    "ALTER TABLE records ADD COLUMN request_ref INTEGER",
    "ALTER TABLE records ADD COLUMN bytes INTEGER NOT NULL DEFAULT 0",
    "CREATE INDEX records_request_ref ON records (request_ref)",
    "CREATE TABLE requests (ref INTEGER PRIMARY KEY, request_id TEXT NOT NULL, metadata TEXT NOT NULL)",
    # rows of the first layout hold their request inline: it counts in their bytes (CAST: UTF-8 bytes, not chars)
    "UPDATE records SET bytes = length(input) + length(logits) + length(features) + length(CAST(scores AS BLOB))"
    " + length(CAST(decision AS BLOB)) + length(CAST(request_id AS BLOB)) + length(CAST(metadata AS BLOB))",
    f"INSERT OR REPLACE INTO counters SELECT 'bytes', COALESCE(SUM(bytes), 0) FROM records WHERE state != '{SENT}'",
)

# Run once, in the transaction of the upgrade, on a file whose requests have no stored column yet.
REQUESTS_STORED = "ALTER TABLE requests ADD COLUMN stored REAL"

# Run (idempotent) on every open, in the transaction of the upgrade: indexes added after the first two layouts.
INDEXES = (
    "CREATE INDEX IF NOT EXISTS records_group ON records (model, version, state, flagged, time)",
    "CREATE INDEX IF NOT EXISTS records_model_state_seq ON records (model, state, seq)",
    "CREATE INDEX IF NOT EXISTS requests_request_id ON requests (request_id, stored)",
)

COLUMNS = ("seq, id, time, model, version, flagged, state, input, logits, features, scores, decision, request_id, "
           "metadata, request_ref")
REF = 14  # index of request_ref in a row of COLUMNS



#: rows per multi-row INSERT (15 parameters a record row: far below SQLite's 32766 parameters per statement)
INSERT_CHUNK = 256


def _insert_many(db: sqlite3.Connection, head: str, values: str, rows: Sequence[tuple]) -> None:
    """``head`` + ``values`` repeated, :data:`INSERT_CHUNK` rows per statement. Python's sqlite3 releases the GIL
    around every step, and ``executemany`` steps once per row: in a gateway whose event loop is busy, every
    release is a hand-off to the loop and back (measured under all-flagged load at concurrency 64: ~90 us of
    thread CPU a record in the transaction, against ~50 us for a whole put on an idle process), so a
    micro-batch's records go in a few statements, not one per row."""
    for start in range(0, len(rows), INSERT_CHUNK):
        chunk = rows[start:start + INSERT_CHUNK]
        db.execute(head + ", ".join([values] * len(chunk)), [v for row in chunk for v in row])


#: (model, request id) -> item position -> (record id, packed input): what a retry of a request is matched against
Known = dict[tuple[str, str], dict[int, tuple[str, bytes]]]


@dataclass
class _InsertState:
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


class _Batch:
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


def _enable_wal(db: sqlite3.Connection, timeout_s: float = 30.0) -> None:
    """``PRAGMA journal_mode=WAL``, retried until ``timeout_s``: switching a fresh file's journal mode needs a lock
    that SQLite does not wait for (its busy handler is not called), so two processes opening the same new queue at
    once (``oodguard serve --workers N``) got "database is locked" in one of them."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(0.02)


class SQLiteQueue(QueryQueue):
    def __init__(self, path: str | Path, max_size: int = 100_000, full_policy: str = "reject",
                 max_bytes: int = DEFAULT_MAX_BYTES, create: bool = True, idempotency_window_s: float = 0.0):
        check_bounds(max_size, max_bytes, full_policy, idempotency_window_s)
        self.path = Path(path)
        self.max_size = max_size
        self.max_bytes = max_bytes
        self.full_policy = full_policy
        self.idempotency_window_s = idempotency_window_s
        if create:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        elif not self.path.is_file():
            raise FileNotFoundError(f"no queue at {self.path.absolute()}")
        self._lock = threading.Lock()
        self._pending_lock = threading.Lock()
        self._pending: list[_Batch] = []
        self._reachable = True  # False while the last operation failed with an SQLite error
        #: (PRAGMA data_version, unharvested records) as this connection left them after its last put; None: unknown
        self._size_seen: tuple[int, int] | None = None
        self._drops = DropLog(log, str(self.path))
        # create=False: mode=rw never creates the file, even if it vanished since the check above
        target, uri = (str(self.path), False) if create else (f"file:{quote(str(self.path.absolute()))}?mode=rw", True)
        self._db: sqlite3.Connection | None = None
        try:
            self._db = sqlite3.connect(target, check_same_thread=False, isolation_level=None, timeout=30.0, uri=uri)
            _enable_wal(self._db)
            self._db.execute("PRAGMA synchronous=FULL")
        except sqlite3.Error as exc:
            if self._db is not None:
                self._db.close()
                self._db = None
            raise QueueError(f"queue {self.path}: {exc}") from exc
        self._write(self._upgrade)

    # -- helpers -------------------------------------------------------------------------------
    @staticmethod
    def _upgrade(db: sqlite3.Connection) -> None:
        """Make the first layout, then bring it to the current one, in one IMMEDIATE transaction: other processes
        (the workers of ``oodguard serve --workers N``) may be opening the same fresh file at the same moment, and
        a write transaction waits for them (the busy timeout) where schema statements run one by one would fail
        with "database is locked"."""
        for statement in filter(str.strip, SCHEMA.split(";")):
            db.execute(statement)
        if "request_ref" not in {row[1] for row in db.execute("PRAGMA table_info(records)")}:
            for statement in UPGRADE:
                db.execute(statement)
        if "stored" not in {row[1] for row in db.execute("PRAGMA table_info(requests)")}:
            db.execute(REQUESTS_STORED)
        for statement in INDEXES:
            db.execute(statement)

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise QueueError(f"queue {self.path} is closed")
        return self._db

    def _write(self, fn):
        """Run ``fn(conn)`` in one IMMEDIATE transaction under the lock."""
        with self._lock:
            self._size_seen = None  # this connection's own changes do not move data_version: count again
            return self._transaction(fn)

    def _transaction(self, fn):
        """``fn(conn)`` in one IMMEDIATE (write) transaction; the caller holds the lock."""
        return self._run(fn, "BEGIN IMMEDIATE")

    def _read(self, fn):
        """``fn(conn)`` in one read transaction under the lock: its statements see one snapshot of the file
        (a record and its request row, even while another process purges)."""
        with self._lock:
            return self._run(fn, "BEGIN DEFERRED")

    def _run(self, fn, begin: str):
        """``fn(conn)`` between ``begin`` and COMMIT (ROLLBACK if it raises); notes whether SQLite failed."""
        db = self._conn()
        try:
            db.execute(begin)
            try:
                result = fn(db)
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            self._reachable = False
            raise QueueError(f"queue {self.path}: {exc}") from exc
        self._reachable = True
        return result

    def _records(self, db: sqlite3.Connection, rows: list[tuple]) -> list[QueueRecord]:
        """Records for rows of :data:`COLUMNS`, their request rows read once per request."""
        refs = sorted({row[REF] for row in rows if row[REF] is not None})
        requests = {}
        for start in range(0, len(refs), 500):  # within SQLite's limit on parameters
            chunk = refs[start:start + 500]
            marks = ",".join("?" * len(chunk))
            for ref, request_id, metadata in db.execute(
                    f"SELECT ref, request_id, metadata FROM requests WHERE ref IN ({marks})", chunk):
                requests[ref] = (request_id, json.loads(metadata))
        return [self._row(row, requests.get(row[REF])) for row in rows]

    @staticmethod
    def _row(row: tuple, request: tuple[str, dict] | None) -> QueueRecord:
        seq, rid, t, model, version, flagged, state, inp, logits, feats, scores, decision, request_id, metadata, _ = row
        if request is None:  # a row of the first layout, or a record without request
            request = (request_id, json.loads(metadata))
        return QueueRecord(
            model=model, version=int(version), input=unpack_array(inp), logits=unpack_array(logits),
            features=unpack_array(feats), scores=json.loads(scores), decision=json.loads(decision),
            flagged=bool(flagged), request_id=request[0], metadata=dict(request[1]),  # a copy: readers may change it
            time=float(t), id=rid, seq=int(seq), state=state,
        )

    @staticmethod
    def _bump(db: sqlite3.Connection, name: str, by: int) -> None:
        if by:
            db.execute("UPDATE counters SET value = value + ? WHERE name = ?", (by, name))

    @staticmethod
    def _drop_orphans(db: sqlite3.Connection, refs) -> None:
        """Delete the request rows among ``refs`` that no record references any more."""
        db.executemany("DELETE FROM requests WHERE ref = ?1 AND NOT EXISTS "
                       "(SELECT 1 FROM records WHERE request_ref = ?1)", [(ref,) for ref in refs if ref is not None])

    # -- interface -----------------------------------------------------------------------------
    def put(self, records: Sequence[NewRecord]) -> list[str | None]:
        return self.put_prepared(self.prepare(records))

    def put_prepared(self, prepared: "_Batch") -> list[str | None]:
        return self._group_commit(prepared) if prepared.rows else []

    def prepare(self, records: Sequence[NewRecord]) -> "_Batch":
        now = time.time()
        requests, refs = group_requests(records)
        rows, sizes = [], []
        decisions = decisions_json([r.decision for r in records])
        for r, rid, decision in zip(records, new_record_ids(len(records), now), decisions):
            arrays = (pack_array(r.input), pack_array(r.logits), pack_array(r.features))
            scores = json.dumps({k: float(v) for k, v in r.scores.items()})
            rows.append((rid, now if r.time is None else float(r.time), r.model, int(r.version),
                         int(bool(r.flagged)), *arrays, scores, decision))
            sizes.append(sum(map(len, arrays)) + len(scores.encode()) + len(decision.encode()))
        return _Batch(rows, sizes, refs, requests, request_runs(records) if self.idempotency_window_s else [], now)

    def _group_commit(self, mine: _Batch) -> list[str | None]:
        """Durable writes cost one fsync per transaction, so concurrent ``put`` calls share one: each
        caller queues its batch; whoever takes the lock first commits every queued batch in one transaction
        (each batch applied in order, with the same bound and policy as alone); the others find their
        batch done when they get the lock. Nobody returns before its rows are committed. The unharvested
        record count is read once per transaction (a scan of the state index, the one read here whose cost grows
        with the queue) and carried from batch to batch."""
        with self._pending_lock:
            self._pending.append(mine)
        with self._lock:
            if not mine.done:
                with self._pending_lock:
                    batches, self._pending = self._pending, []
                counted = self._size_seen
                self._size_seen = None  # set again once this transaction has committed
                try:
                    results, seen = self._transaction(lambda db: self._insert_all(db, batches, counted))
                except BaseException as exc:
                    for b in batches:
                        b.error, b.done = exc, True
                    raise
                self._size_seen = seen
                for b, result in zip(batches, results):
                    b.result, b.done = result, True
                    self._drops.note("evicted", b.evicted)
                    self._drops.note("refused", b.refused)
        if mine.error is not None:
            raise mine.error
        return mine.result

    def _insert_all(self, db: sqlite3.Connection, batches: list[_Batch],
                    counted: tuple[int, int] | None = None) -> tuple[list[list[str | None]], tuple[int, int]]:
        """Every batch's rows, in order, in the caller's transaction; per batch its ids, and (data_version, the
        unharvested records after them) for the next put.

        The unharvested count is a scan of the state index, whose cost grows with the queue (about 1.5 ms per
        transaction at 30,000 records, once per micro-batch under flagged load). ``counted`` is what this
        connection's previous put left; ``PRAGMA data_version`` changes exactly when another connection (another
        worker, a harvest) committed since, so an unchanged version means the count is still exact, as every
        other write of this connection clears it (:meth:`_write`). Read inside this IMMEDIATE transaction, no
        other writer can commit between the check and the commit.

        Few statements: every statement step releases the GIL and takes it back, and in a gateway whose event
        loop holds the GIL each take-back is a forced thread switch (measured under all-flagged load at
        concurrency 64: the writer thread's CPU per request was half system time). So the transaction reads
        what it needs in one SELECT (and one more for the idempotency check when a batch has request ids) and
        updates the counters in one UPDATE, whatever the number of batches."""
        version, used, top_ref = db.execute(
            "SELECT (SELECT data_version FROM pragma_data_version), (SELECT value FROM counters WHERE name = 'bytes'), "
            "(SELECT COALESCE(MAX(ref), 0) FROM requests)").fetchone()
        if counted is not None and counted[0] == version:
            size = counted[1]
        else:
            size = db.execute("SELECT COUNT(*) FROM records WHERE state != ?", (SENT,)).fetchone()[0]
        known = self._recent(db, {run.request_id for batch in batches for run in batch.runs})
        state = _InsertState(size, used, top_ref + 1, known)
        results = [self._insert(db, batch, state) for batch in batches]
        added = {"accepted": state.accepted, "rejected": state.rejected, "evicted": state.evicted,
                 "bytes": state.used - used}
        if any(added.values()):
            db.execute("UPDATE counters SET value = value + CASE name WHEN 'accepted' THEN ? WHEN 'rejected' THEN ? "
                       "WHEN 'evicted' THEN ? ELSE ? END WHERE name IN ('accepted', 'rejected', 'evicted', 'bytes')",
                       (added["accepted"], added["rejected"], added["evicted"], added["bytes"]))
        return results, (version, state.size)

    def _recent(self, db: sqlite3.Connection, request_ids: set[str]) -> Known:
        """The records stored within the idempotency window under these request ids that carry an item
        position, by (model, request id) and item (the latest per item)."""
        known: Known = {}
        since = time.time() - self.idempotency_window_s
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

    @staticmethod
    def _earlier(run: RequestRun, rows: list[tuple], state: _InsertState) -> list[str] | None:
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

    def _insert(self, db: sqlite3.Connection, batch: _Batch, state: _InsertState) -> list[str | None]:
        """Insert one ``put`` call's rows within both bounds (applying the full-queue policy), ``state`` holding
        the unharvested records and bytes before it (updated here); their ids. The rows are decided one by one,
        then inserted by multi-row statements (:func:`_insert_many`; request rows get their refs here, above the
        largest one: no other writer runs inside this IMMEDIATE transaction). Eviction takes the oldest pending
        records stored before this batch (its own rows are inserted after the decisions). The rows of a retried
        request are not inserted: they get the ids of its earlier records (:meth:`_earlier`)."""
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
                repeated.update(zip(range(run.start, run.stop), self._earlier(run, batch.rows, state) or []))
            elif run is not None and j >= run.stop:
                run = None
            if j in repeated:
                out.append(repeated[j])
                continue
            if ref is not None and ref not in stored:
                nbytes += request_bytes(batch.requests[ref])  # the first record stored carries its request row
            if self.full_policy == "evict-oldest" and nbytes <= self.max_bytes:
                while size >= self.max_size or used + nbytes > self.max_bytes:
                    victim = db.execute("SELECT seq, id, bytes, request_ref FROM records WHERE state = ? "
                                        "ORDER BY seq LIMIT 1", (PENDING,)).fetchone()
                    if victim is None:
                        break
                    db.execute("DELETE FROM records WHERE seq = ?", (victim[0],))
                    self._drop_orphans(db, [victim[3]])
                    size, used = size - 1, used - victim[2]
                    batch.evicted.append(victim[1])
                    state.gone.add(victim[1])
            if size >= self.max_size or used + nbytes > self.max_bytes:
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
        _insert_many(db, "INSERT INTO requests (ref, request_id, metadata, stored) VALUES ", "(?, ?, ?, ?)",
                     request_rows)
        _insert_many(db, "INSERT INTO records (id, time, model, version, flagged, input, logits, features, scores, "
                         "decision, state, request_id, metadata, request_ref, bytes) VALUES ",
                     "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, '', '{}', ?, ?)", record_rows)
        state.size, state.used = size, used
        state.accepted += len(record_rows)
        state.rejected += out.count(None)
        state.evicted += len(batch.evicted)
        return out

    def get(self, ids: Sequence[str]) -> list[QueueRecord]:
        if not ids:
            return []
        marks = ",".join("?" * len(ids))
        rows = self._read(lambda db: self._records(
            db, db.execute(f"SELECT {COLUMNS} FROM records WHERE id IN ({marks})", list(ids)).fetchall()))
        found = {r.id: r for r in rows}
        return [found[i] for i in ids if i in found]

    def select(self, limit: int | None = None, state: str = PENDING, flagged: bool | None = None,
               model: str | None = None, version: int | None = None, since: float | None = None,
               until: float | None = None) -> list[QueueRecord]:
        if state not in STATES:
            raise ValueError(f"state must be one of {STATES}, got {state!r}")
        if limit is not None and limit <= 0:
            self._conn()
            return []
        where, params = ["state = ?"], [state]
        for column, value in (("flagged", None if flagged is None else int(bool(flagged))), ("model", model),
                              ("version", None if version is None else int(version))):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        if since is not None:
            where.append("time >= ?")
            params.append(float(since))
        if until is not None:
            where.append("time < ?")
            params.append(float(until))
        sql = f"SELECT {COLUMNS} FROM records WHERE {' AND '.join(where)} ORDER BY seq"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(int(limit))
        return self._read(lambda db: self._records(db, db.execute(sql, params).fetchall()))

    def summary(self) -> list[SummaryRow]:
        rows = self._read(lambda db: db.execute(
            "SELECT model, version, state, flagged, COUNT(*), MIN(time), MAX(time) FROM records "
            "GROUP BY model, version, state, flagged ORDER BY model, version, state, flagged").fetchall())
        return [SummaryRow(model=m, version=int(v), state=st, flagged=bool(f), count=int(n), oldest=float(lo),
                           newest=float(hi)) for m, v, st, f, n, lo, hi in rows]

    def delete(self, ids: Sequence[str]) -> int:
        ids = list(dict.fromkeys(ids))
        if not ids:
            self._conn()
            return 0

        def write(db: sqlite3.Connection) -> int:
            deleted, freed, refs = 0, 0, set()
            for start in range(0, len(ids), 500):  # within SQLite's limit on parameters
                chunk = ids[start:start + 500]
                marks = ",".join("?" * len(chunk))
                for state, nbytes, ref in db.execute(
                        f"DELETE FROM records WHERE id IN ({marks}) RETURNING state, bytes, request_ref", chunk).fetchall():
                    deleted += 1
                    if state != SENT:  # sent records no longer count in the bytes counter
                        freed += nbytes
                    refs.add(ref)
            self._bump(db, "bytes", -freed)
            self._drop_orphans(db, refs)
            return deleted

        return self._write(write)

    def claim(self, limit: int, flagged: bool | None = None) -> list[QueueRecord]:
        def write(db: sqlite3.Connection) -> list[QueueRecord]:
            sql = f"SELECT {COLUMNS} FROM records WHERE state = ?"
            params: list = [PENDING]
            if flagged is not None:
                sql += " AND flagged = ?"
                params.append(int(flagged))
            rows = db.execute(sql + " ORDER BY seq LIMIT ?", params + [int(limit)]).fetchall()
            db.executemany("UPDATE records SET state = ? WHERE seq = ?", [(CLAIMED, row[0]) for row in rows])
            records = self._records(db, rows)
            for r in records:
                r.state = CLAIMED
            return records

        return self._write(write)

    def claim_ids(self, ids: Sequence[str]) -> list[str]:
        def write(db: sqlite3.Connection) -> list[str]:
            claimed = []
            for record_id in ids:
                moved = db.execute("UPDATE records SET state = ? WHERE id = ? AND state = ?", (CLAIMED, record_id, PENDING))
                if moved.rowcount:
                    claimed.append(record_id)
            return claimed

        return self._write(write) if ids else []

    def _move(self, ids: Sequence[str], to_state: str, from_states: tuple[str, ...]) -> int:
        marks = ",".join("?" * len(from_states))

        def write(db: sqlite3.Connection) -> int:
            moved = [row for i in ids for row in db.execute(
                f"UPDATE records SET state = ? WHERE id = ? AND state IN ({marks}) RETURNING bytes",
                (to_state, i, *from_states))]
            if to_state == SENT:  # out of the unharvested set (claimed -> pending keeps the bytes counted)
                self._bump(db, "bytes", -sum(nbytes for (nbytes,) in moved))
            return len(moved)

        return self._write(write) if ids else 0

    def release(self, ids: Sequence[str]) -> int:
        return self._move(ids, PENDING, (CLAIMED,))

    def mark_sent(self, ids: Sequence[str]) -> int:
        return self._move(ids, SENT, (PENDING, CLAIMED))

    def purge_sent(self) -> int:
        def write(db: sqlite3.Connection) -> int:
            refs = [ref for (ref,) in db.execute(
                "SELECT DISTINCT request_ref FROM records WHERE state = ? AND request_ref IS NOT NULL", (SENT,))]
            purged = db.execute("DELETE FROM records WHERE state = ?", (SENT,)).rowcount
            self._drop_orphans(db, refs)
            return purged

        return self._write(write)

    def stats(self) -> QueueStats:
        counts, counters = self._read(lambda db: (
            {(state, bool(flagged)): n for state, flagged, n in
             db.execute("SELECT state, flagged, COUNT(*) FROM records GROUP BY state, flagged")},
            dict(db.execute("SELECT name, value FROM counters").fetchall())))

        def n(state: str) -> int:
            return counts.get((state, True), 0) + counts.get((state, False), 0)

        return QueueStats(
            size=n(PENDING) + n(CLAIMED), pending=n(PENDING), claimed=n(CLAIMED), sent=n(SENT),
            flagged=counts.get((PENDING, True), 0) + counts.get((CLAIMED, True), 0),
            sampled=counts.get((PENDING, False), 0) + counts.get((CLAIMED, False), 0),
            max_size=self.max_size, full_policy=self.full_policy, accepted=int(counters.get("accepted", 0)),
            rejected=int(counters.get("rejected", 0)), evicted=int(counters.get("evicted", 0)),
            bytes=int(counters.get("bytes", 0)), max_bytes=self.max_bytes,
        )

    def local_state(self) -> LocalQueueState:
        return LocalQueueState(spool_backlog=0, reachable=self._reachable)

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._drops.flush()
                try:
                    self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                finally:
                    self._db.close()
                    self._db = None
