"""The SQLite queue's file layout: files of older layouts upgraded in place when opened, and processes
opening one fresh file at once."""

import json
import sqlite3

from oodguard.queues.base import PENDING, SENT
from oodguard.queues.codec import pack_array
from oodguard.queues.sqlite import SQLiteQueue

from .store_checks import assert_stored_as_put, own_bytes, record, request_bytes


# The layout before request rows (a copy: the module's SCHEMA may change).
OLD_SCHEMA = """
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


def test_a_file_of_the_old_layout_is_upgraded_in_place(tmp_path):
    path = tmp_path / "old.sqlite"
    olds = [record(0), record(1, flagged=False), record(2)]
    with sqlite3.connect(path) as db:
        db.executescript(OLD_SCHEMA)
        for i, r in enumerate(olds):
            db.execute("INSERT INTO records (id, time, model, version, flagged, state, input, logits, features, scores,"
                       " decision, request_id, metadata) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (f"old{i}", r.time, r.model, r.version, int(r.flagged), SENT if i == 2 else PENDING,
                        pack_array(r.input), pack_array(r.logits), pack_array(r.features),
                        json.dumps(r.scores), json.dumps(r.decision), r.request_id, json.dumps(r.metadata)))
        db.execute("UPDATE counters SET value = 3 WHERE name = 'accepted'")
    db.close()
    q = SQLiteQueue(path)
    for rec, orig, rid in zip(q.get(["old0", "old1"]), olds, ["old0", "old1"]):
        assert_stored_as_put(rec, orig, rid)
    inline = [own_bytes(r) + request_bytes(r) for r in olds]  # the old rows hold their request inline
    s = q.stats()
    assert (s.size, s.sent, s.accepted, s.bytes) == (2, 1, 3, inline[0] + inline[1])
    new = q.put([record(3)])
    assert q.stats().bytes == inline[0] + inline[1] + own_bytes(record(3)) + request_bytes(record(3))
    assert q.mark_sent(["old0"]) == 1 and q.purge_sent() == 2
    assert [r.id for r in q.select()] == ["old1", new[0]]
    q.close()
    q = SQLiteQueue(path)  # opened again: nothing to upgrade, the counter stays
    assert q.stats().bytes == inline[1] + own_bytes(record(3)) + request_bytes(record(3))
    assert_stored_as_put(q.get(new)[0], record(3), new[0])
    q.close()


def test_an_old_file_gets_the_new_indexes_and_answers_the_new_reads(tmp_path):
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as db:
        db.executescript(OLD_SCHEMA)
        olds = [record(0), record(1, flagged=False)]
        for i, r in enumerate(olds):
            db.execute("INSERT INTO records (id, time, model, version, flagged, state, input, logits, features, scores,"
                       " decision, request_id, metadata) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (f"old{i}", r.time, r.model, r.version, int(r.flagged), PENDING, pack_array(r.input),
                        pack_array(r.logits), pack_array(r.features), json.dumps(r.scores), json.dumps(r.decision),
                        r.request_id, json.dumps(r.metadata)))
    db.close()
    q = SQLiteQueue(path)
    assert [(r.version, r.flagged, r.count) for r in q.summary()] == [(1, True, 1), (2, False, 1)]
    assert [r.id for r in q.select(model="digits", version=2)] == ["old1"]
    assert q.delete(["old0"]) == 1 and q.stats().bytes == own_bytes(olds[1]) + request_bytes(olds[1])
    q.close()
    with sqlite3.connect(path) as db:
        names = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    db.close()
    assert {"records_group", "records_model_state_seq"} <= names


def _open_at_once(path, barrier, results):
    from oodguard.queues.sqlite import SQLiteQueue

    barrier.wait()
    try:
        SQLiteQueue(path).close()
        results.put("ok")
    except Exception as exc:  # reported to the parent, which asserts on it
        results.put(repr(exc))


def test_processes_opening_one_fresh_queue_at_once_all_succeed(tmp_path):
    """The workers of `serve --workers N` open the same new file at the same moment: switching it to WAL must wait
    for the others instead of failing one of them with 'database is locked'."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    for attempt in range(20):
        path = tmp_path / f"q{attempt}.sqlite"
        barrier, results = context.Barrier(12), context.Queue()
        procs = [context.Process(target=_open_at_once, args=(path, barrier, results)) for _ in range(12)]
        for proc in procs:
            proc.start()
        outcomes = [results.get(timeout=60) for _ in procs]
        for proc in procs:
            proc.join(timeout=60)
        assert outcomes == ["ok"] * 12, outcomes
