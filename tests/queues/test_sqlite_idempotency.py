"""The SQLite queue's idempotency: a retried request stored once within the window, again after it, and
requests of a file older than their stored time."""

import sqlite3

import pytest

from oodguard.queues.sqlite import SQLiteQueue

from .store_checks import check_retried_requests_are_stored_once, check_the_retry_window, retried


def test_a_retried_request_is_stored_once(tmp_path):
    q = SQLiteQueue(tmp_path / "q.sqlite", idempotency_window_s=600)
    check_retried_requests_are_stored_once(q)
    plan = q._db.execute("EXPLAIN QUERY PLAN SELECT r.id FROM requests q JOIN records r ON r.request_ref = q.ref "
                         "WHERE q.request_id IN ('r1', 'r2') AND q.stored >= 0").fetchall()
    assert "requests_request_id" in " ".join(row[-1] for row in plan)  # no scan of the requests
    q.close()


def test_a_retry_after_the_window_is_stored_again(tmp_path):
    made = []

    def make(window_s):
        made.append(SQLiteQueue(tmp_path / f"q{len(made)}.sqlite", idempotency_window_s=window_s))
        return made[-1]

    check_the_retry_window(make)


def test_a_file_without_request_times_gets_them_and_its_requests_answer_no_retry(tmp_path):
    path = tmp_path / "q.sqlite"
    q = SQLiteQueue(path, idempotency_window_s=600)
    first = q.put(retried("r1"))
    q.close()
    with sqlite3.connect(path) as db:  # the layout before request rows had a stored time
        db.execute("DROP INDEX requests_request_id")
        db.execute("ALTER TABLE requests DROP COLUMN stored")
    db.close()
    q = SQLiteQueue(path, idempotency_window_s=600)
    second = q.put(retried("r1"))  # its first copy has no stored time: not within any window
    assert all(second) and set(second).isdisjoint(first) and q.put(retried("r1")) == second
    q.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT COUNT(*) FROM requests WHERE stored IS NULL").fetchone()[0] == 1
        assert db.execute("SELECT name FROM sqlite_master WHERE name = 'requests_request_id'").fetchone()
    db.close()
    with pytest.raises(ValueError, match="idempotency_window_s"):
        SQLiteQueue(path, idempotency_window_s=-1)
    q = SQLiteQueue(path)  # the default: no check
    assert set(q.put(retried("r1"))).isdisjoint(second)
    q.close()
