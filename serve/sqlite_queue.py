"""The query queue in one SQLite file (WAL, ``synchronous=FULL``: a committed put survives a crash).

One row per item. Arrays (model input, logits, features) are stored as ``np.save`` bytes compressed
with zlib; scores, decision and metadata as JSON text. Counters (accepted, rejected, evicted) live in
the same file, so they survive restarts.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import struct
import uuid
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np

from .queue import CLAIMED, PENDING, SENT, STATES, NewRecord, QueryQueue, QueueError, QueueRecord, QueueStats

FULL_POLICIES = ("reject", "evict-oldest")

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

COLUMNS = "seq, id, time, model, version, flagged, state, input, logits, features, scores, decision, request_id, metadata"


ARRAY_DTYPES = ("<f4", "<f8", "|u1", "<i8")


def pack_array(array: np.ndarray) -> bytes:
    """zlib of ``[dtype code, ndim, dims as u32 ...] + little-endian data``: a tiny fixed header instead of
    ``np.save``'s text header, whose parsing (``ast.literal_eval``) dominated reading large pools."""
    array = np.asarray(array)
    code = array.dtype.newbyteorder("<").str if array.dtype.byteorder != "|" else array.dtype.str
    if code not in ARRAY_DTYPES:
        raise QueueError(f"cannot store arrays of dtype {array.dtype} (supported: {ARRAY_DTYPES})")
    header = struct.pack(f"<BB{array.ndim}I", ARRAY_DTYPES.index(code), array.ndim, *array.shape)
    return zlib.compress(header + array.astype(code, copy=False).tobytes(), 6)


def unpack_array(blob: bytes) -> np.ndarray:
    raw = zlib.decompress(blob)
    code, ndim = raw[0], raw[1]
    shape = struct.unpack_from(f"<{ndim}I", raw, 2)
    return np.frombuffer(raw, dtype=ARRAY_DTYPES[code], offset=2 + 4 * ndim).reshape(shape)


class _Batch:
    """One ``put`` call's rows waiting for a group commit, and its outcome."""

    def __init__(self, rows: list[tuple]):
        self.rows = rows
        self.done = False
        self.result: list[str | None] = []
        self.error: BaseException | None = None


class SQLiteQueue(QueryQueue):
    def __init__(self, path: str | Path, max_size: int = 100_000, full_policy: str = "reject"):
        if max_size < 1:
            raise ValueError(f"max_size must be >= 1, got {max_size}")
        if full_policy not in FULL_POLICIES:
            raise ValueError(f"full_policy must be one of {FULL_POLICIES}, got {full_policy!r}")
        self.path = Path(path)
        self.max_size = max_size
        self.full_policy = full_policy
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._pending_lock = threading.Lock()
        self._pending: list[_Batch] = []
        self._db: sqlite3.Connection | None = sqlite3.connect(
            str(self.path), check_same_thread=False, isolation_level=None, timeout=30.0
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)

    # -- helpers -------------------------------------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise QueueError(f"queue {self.path} is closed")
        return self._db

    def _write(self, fn):
        """Run ``fn(conn)`` in one IMMEDIATE transaction under the lock."""
        with self._lock:
            return self._transaction(fn)

    def _transaction(self, fn):
        """``fn(conn)`` in one IMMEDIATE transaction; the caller holds the lock."""
        db = self._conn()
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                result = fn(db)
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            return result
        except sqlite3.Error as exc:
            raise QueueError(f"queue {self.path}: {exc}") from exc

    def _read(self, sql: str, params: Sequence = ()) -> list[tuple]:
        with self._lock:
            try:
                return self._conn().execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise QueueError(f"queue {self.path}: {exc}") from exc

    @staticmethod
    def _row(row: tuple) -> QueueRecord:
        seq, rid, t, model, version, flagged, state, inp, logits, feats, scores, decision, request_id, metadata = row
        return QueueRecord(
            model=model, version=int(version), input=unpack_array(inp), logits=unpack_array(logits),
            features=unpack_array(feats), scores=json.loads(scores), decision=json.loads(decision),
            flagged=bool(flagged), request_id=request_id, metadata=json.loads(metadata), time=float(t),
            id=rid, seq=int(seq), state=state,
        )

    @staticmethod
    def _bump(db: sqlite3.Connection, name: str, by: int) -> None:
        if by:
            db.execute("UPDATE counters SET value = value + ? WHERE name = ?", (by, name))

    # -- interface -----------------------------------------------------------------------------
    def put(self, records: Sequence[NewRecord]) -> list[str | None]:
        if not records:
            return []
        now = time.time()
        rows = []
        for r in records:
            rows.append((
                uuid.uuid4().hex, now if r.time is None else float(r.time), r.model, int(r.version), int(bool(r.flagged)),
                PENDING, pack_array(r.input), pack_array(r.logits), pack_array(r.features),
                json.dumps({k: float(v) for k, v in r.scores.items()}), json.dumps(r.decision), r.request_id or "",
                json.dumps({str(k): str(v) for k, v in (r.metadata or {}).items()}),
            ))
        return self._group_commit(rows)

    def _group_commit(self, rows: list[tuple]) -> list[str | None]:
        """Durable writes cost one fsync per transaction, so concurrent ``put`` calls share one: each
        caller queues its rows; whoever takes the lock first commits every queued batch in one transaction
        (each batch applied in order, with the same bound and policy as alone); the others find their
        batch done when they get the lock. Nobody returns before its rows are committed."""
        mine = _Batch(rows)
        with self._pending_lock:
            self._pending.append(mine)
        with self._lock:
            if not mine.done:
                with self._pending_lock:
                    batches, self._pending = self._pending, []
                try:
                    results = self._transaction(lambda db: [self._insert(db, b.rows) for b in batches])
                except BaseException as exc:
                    for b in batches:
                        b.error, b.done = exc, True
                    raise
                for b, result in zip(batches, results):
                    b.result, b.done = result, True
        if mine.error is not None:
            raise mine.error
        return mine.result

    def _insert(self, db: sqlite3.Connection, rows: list[tuple]) -> list[str | None]:
        """Insert one ``put`` call's rows within the bound (applying the full-queue policy); their ids."""
        size = db.execute("SELECT COUNT(*) FROM records WHERE state != ?", (SENT,)).fetchone()[0]
        room = self.max_size - size
        keep = len(rows)
        if room < len(rows):
            if self.full_policy == "evict-oldest":
                need = len(rows) - max(room, 0)
                victims = [v for (v,) in db.execute(
                    "SELECT seq FROM records WHERE state = ? ORDER BY seq LIMIT ?", (PENDING, need))]
                db.executemany("DELETE FROM records WHERE seq = ?", [(v,) for v in victims])
                self._bump(db, "evicted", len(victims))
                room += len(victims)
            keep = max(0, min(len(rows), room))
        db.executemany(
            "INSERT INTO records (id, time, model, version, flagged, state, input, logits, features, scores, "
            "decision, request_id, metadata) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows[:keep])
        self._bump(db, "accepted", keep)
        self._bump(db, "rejected", len(rows) - keep)
        return [row[0] for row in rows[:keep]] + [None] * (len(rows) - keep)

    def get(self, ids: Sequence[str]) -> list[QueueRecord]:
        if not ids:
            return []
        marks = ",".join("?" * len(ids))
        found = {row[1]: self._row(row) for row in self._read(f"SELECT {COLUMNS} FROM records WHERE id IN ({marks})", list(ids))}
        return [found[i] for i in ids if i in found]

    def select(self, limit: int | None = None, state: str = PENDING, flagged: bool | None = None) -> list[QueueRecord]:
        if state not in STATES:
            raise ValueError(f"state must be one of {STATES}, got {state!r}")
        sql = f"SELECT {COLUMNS} FROM records WHERE state = ?"
        params: list = [state]
        if flagged is not None:
            sql += " AND flagged = ?"
            params.append(int(flagged))
        sql += " ORDER BY seq"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(int(limit))
        return [self._row(row) for row in self._read(sql, params)]

    def claim(self, limit: int, flagged: bool | None = None) -> list[QueueRecord]:
        def write(db: sqlite3.Connection) -> list[QueueRecord]:
            sql = f"SELECT {COLUMNS} FROM records WHERE state = ?"
            params: list = [PENDING]
            if flagged is not None:
                sql += " AND flagged = ?"
                params.append(int(flagged))
            rows = db.execute(sql + " ORDER BY seq LIMIT ?", params + [int(limit)]).fetchall()
            db.executemany("UPDATE records SET state = ? WHERE seq = ?", [(CLAIMED, row[0]) for row in rows])
            records = [self._row(row) for row in rows]
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
            cur = db.executemany(
                f"UPDATE records SET state = ? WHERE id = ? AND state IN ({marks})",
                [(to_state, i, *from_states) for i in ids])
            return cur.rowcount

        return self._write(write) if ids else 0

    def release(self, ids: Sequence[str]) -> int:
        return self._move(ids, PENDING, (CLAIMED,))

    def mark_sent(self, ids: Sequence[str]) -> int:
        return self._move(ids, SENT, (PENDING, CLAIMED))

    def purge_sent(self) -> int:
        return self._write(lambda db: db.execute("DELETE FROM records WHERE state = ?", (SENT,)).rowcount)

    def stats(self) -> QueueStats:
        counts = {(state, bool(flagged)): n for state, flagged, n in
                  self._read("SELECT state, flagged, COUNT(*) FROM records GROUP BY state, flagged")}
        counters = dict(self._read("SELECT name, value FROM counters"))

        def n(state: str) -> int:
            return counts.get((state, True), 0) + counts.get((state, False), 0)

        return QueueStats(
            size=n(PENDING) + n(CLAIMED), pending=n(PENDING), claimed=n(CLAIMED), sent=n(SENT),
            flagged=counts.get((PENDING, True), 0) + counts.get((CLAIMED, True), 0),
            sampled=counts.get((PENDING, False), 0) + counts.get((CLAIMED, False), 0),
            max_size=self.max_size, full_policy=self.full_policy, accepted=int(counters.get("accepted", 0)),
            rejected=int(counters.get("rejected", 0)), evicted=int(counters.get("evicted", 0)),
        )

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                try:
                    self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                finally:
                    self._db.close()
                    self._db = None
