"""The SQLite queue's file layout, its upgrade from older layouts, and the helpers that keep its invariants.

- ``records``: one row per item, ``seq`` (insertion order), ``id``, ``state``, ``flagged``, model, version,
  time; the arrays (model input, logits, features) packed by :func:`~oodguard.queues.codec.pack_array`; scores
  and decision as JSON text; ``bytes``: what the record counts towards ``max_bytes`` (see below);
  ``request_ref``: the ``requests`` row holding its request id and metadata. Columns ``request_id`` /
  ``metadata`` hold them inline only in rows written before request rows existed (``request_ref`` NULL); newer
  rows write ``''`` / ``'{}'`` there (also for a record with neither, which gets no request row).
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
so a request row counts once.

A file of the first layout (no ``request_ref`` / ``bytes``) is upgraded in place when opened (:func:`upgrade`:
:data:`UPGRADE`, then :data:`REQUESTS_STORED` and :data:`INDEXES`); a fresh file is made the same way.
"""

from __future__ import annotations

import sqlite3
import time

from .base import SENT

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


def enable_wal(db: sqlite3.Connection, timeout_s: float = 30.0) -> None:
    """``PRAGMA journal_mode=WAL``, retried until ``timeout_s``: switching a fresh file's journal mode needs a lock
    that SQLite does not wait for (its busy handler is not called), so two processes opening the same new queue at
    once (``oodguard serve --workers N``) would otherwise get "database is locked" in one of them."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(0.02)


def upgrade(db: sqlite3.Connection) -> None:
    """Make the first layout, then bring it to the current one, inside the caller's IMMEDIATE transaction: other
    processes (the workers of ``oodguard serve --workers N``) may be opening the same fresh file at the same
    moment, and a write transaction waits for them (the busy timeout) where schema statements run one by one
    would fail with "database is locked"."""
    for statement in filter(str.strip, SCHEMA.split(";")):
        db.execute(statement)
    if "request_ref" not in {row[1] for row in db.execute("PRAGMA table_info(records)")}:
        for statement in UPGRADE:
            db.execute(statement)
    if "stored" not in {row[1] for row in db.execute("PRAGMA table_info(requests)")}:
        db.execute(REQUESTS_STORED)
    for statement in INDEXES:
        db.execute(statement)


def bump(db: sqlite3.Connection, name: str, by: int) -> None:
    """Add ``by`` to the counter ``name``."""
    if by:
        db.execute("UPDATE counters SET value = value + ? WHERE name = ?", (by, name))


def drop_orphans(db: sqlite3.Connection, refs) -> None:
    """Delete the request rows among ``refs`` that no record references any more."""
    db.executemany("DELETE FROM requests WHERE ref = ?1 AND NOT EXISTS "
                   "(SELECT 1 FROM records WHERE request_ref = ?1)", [(ref,) for ref in refs if ref is not None])


__all__ = ["SCHEMA", "UPGRADE", "REQUESTS_STORED", "INDEXES", "COLUMNS", "REF", "enable_wal", "upgrade", "bump",
           "drop_orphans"]
