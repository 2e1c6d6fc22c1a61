"""The query queue in one SQLite file (WAL, ``synchronous=FULL``: a committed put survives a crash).

The file's tables, indexes and upgrades: :mod:`oodguard.queues.sqlite_schema`. Concurrent puts share one
transaction and one fsync (a group commit, :meth:`SQLiteQueue._group_commit`); what that transaction does, with
the bounds, the full policy and the idempotency check: :mod:`oodguard.queues.sqlite_insert`.

``SQLiteQueue(path, create=False)`` opens an existing file only (:class:`FileNotFoundError` otherwise): the
commands that read a queue never leave an empty file (or its folder) behind.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from pathlib import Path
from typing import Sequence
from urllib.parse import quote

from .base import (CLAIMED, DEFAULT_MAX_BYTES, PENDING, SENT, STATES, DropLog, LocalQueueState, NewRecord,
                   QueryQueue, QueueError, QueueRecord, QueueStats, SummaryRow, check_bounds, decisions_json,
                   new_record_ids, request_runs)
from .codec import group_requests, pack_array, unpack_array
from .sqlite_insert import Batch, Bounds, insert_all
from .sqlite_schema import COLUMNS, REF, bump, drop_orphans, enable_wal, upgrade

log = logging.getLogger("oodguard.queues.sqlite")


class SQLiteQueue(QueryQueue):
    """:class:`QueryQueue` in one SQLite file, shared by every process that opens it (see the module docstring)."""

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
        self._pending: list[Batch] = []
        self._reachable = True  # False while the last operation failed with an SQLite error
        #: (PRAGMA data_version, unharvested records) as this connection left them after its last put; None: unknown
        self._size_seen: tuple[int, int] | None = None
        self._drops = DropLog(log, str(self.path))
        # create=False: mode=rw never creates the file, even if it vanished since the check above
        target, uri = (str(self.path), False) if create else (f"file:{quote(str(self.path.absolute()))}?mode=rw", True)
        self._db: sqlite3.Connection | None = None
        try:
            self._db = sqlite3.connect(target, check_same_thread=False, isolation_level=None, timeout=30.0, uri=uri)
            enable_wal(self._db)
            self._db.execute("PRAGMA synchronous=FULL")
        except sqlite3.Error as exc:
            if self._db is not None:
                self._db.close()
                self._db = None
            raise QueueError(f"queue {self.path}: {exc}") from exc
        self._write(upgrade)

    # -- helpers -------------------------------------------------------------------------------
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

    # -- interface -----------------------------------------------------------------------------
    def put(self, records: Sequence[NewRecord]) -> list[str | None]:
        return self.put_prepared(self.prepare(records))

    def put_prepared(self, prepared: Batch) -> list[str | None]:
        return self._group_commit(prepared) if prepared.rows else []

    def prepare(self, records: Sequence[NewRecord]) -> Batch:
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
        return Batch(rows, sizes, refs, requests, request_runs(records) if self.idempotency_window_s else [], now)

    def _group_commit(self, mine: Batch) -> list[str | None]:
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
                bounds = Bounds(self.max_size, self.max_bytes, self.full_policy, self.idempotency_window_s)
                try:
                    results, seen = self._transaction(lambda db: insert_all(db, batches, bounds, counted))
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
            bump(db, "bytes", -freed)
            drop_orphans(db, refs)
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
                bump(db, "bytes", -sum(nbytes for (nbytes,) in moved))
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
            drop_orphans(db, refs)
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
