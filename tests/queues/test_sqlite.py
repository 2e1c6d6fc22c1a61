"""The SQLite queue's interface: records read back as put, across a reopen; claims, releases, sent records,
selections, summaries and deletes; what opening an existing file only means; whether the last call failed."""

import sqlite3
import threading

import pytest

from oodguard.queues import sqlite_insert
from oodguard.queues.base import PENDING, SENT, LocalQueueState, QueueError
from oodguard.queues.sqlite import SQLiteQueue

from .store_checks import assert_stored_as_put, check_delete, check_select_filters, check_summary, record, requests_left


def test_roundtrip_of_arrays_and_metadata(tmp_path):
    q = SQLiteQueue(tmp_path / "q.sqlite")
    originals = [record(0), record(1, flagged=False)]
    ids = q.put(originals)
    assert len(ids) == 2 and all(isinstance(i, str) and i for i in ids)
    got = q.get(ids)
    for orig, rec, rid in zip(originals, got, ids):
        assert_stored_as_put(rec, orig, rid)
    s = q.stats()
    assert (s.size, s.pending, s.flagged, s.sampled, s.accepted) == (2, 2, 1, 1, 2)
    q.close()
    with pytest.raises(QueueError, match="closed"):
        q.put([record(3)])


def test_durable_across_reopen_with_counters(tmp_path):
    path = tmp_path / "q.sqlite"
    q = SQLiteQueue(path, max_size=2)
    ids = q.put([record(i) for i in range(3)])
    assert ids[2] is None
    q.close()
    q2 = SQLiteQueue(path, max_size=2)
    assert [r.id for r in q2.get(ids[:2])] == ids[:2]
    s = q2.stats()
    assert (s.size, s.accepted, s.rejected) == (2, 2, 1)
    q2.close()


def test_claim_select_release_mark_sent(tmp_path):
    q = SQLiteQueue(tmp_path / "q.sqlite")
    ids = q.put([record(0), record(1, flagged=False), record(2), record(3)])
    assert [r.id for r in q.select(flagged=False)] == [ids[1]]
    assert [r.id for r in q.select(limit=2)] == ids[:2]
    got = q.claim(2, flagged=True)
    assert [r.id for r in got] == [ids[0], ids[2]]
    assert [r.id for r in q.claim(5, flagged=True)] == [ids[3]]
    assert q.claim(5, flagged=True) == []
    assert q.release([ids[2]]) == 1
    assert q.mark_sent([ids[0], ids[1]]) == 2
    assert [r.id for r in q.select(state=SENT)] == [ids[0], ids[1]]
    assert [r.id for r in q.select(state=PENDING)] == [ids[2]]
    with pytest.raises(ValueError):
        q.select(state="lost")


def test_concurrent_puts_from_threads_give_unique_ids(tmp_path):
    q = SQLiteQueue(tmp_path / "q.sqlite", max_size=10_000)
    results: list[list] = []
    lock = threading.Lock()

    def worker(t: int) -> None:
        for j in range(10):
            ids = q.put([record(t * 100 + j), record(t * 100 + j + 50)])
            with lock:
                results.append(ids)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    ids = [i for batch in results for i in batch]
    assert len(ids) == 160 and None not in ids and len(set(ids)) == 160
    assert q.stats().size == 160
    seqs = [r.seq for r in q.select()]
    assert seqs == sorted(seqs) and len(set(seqs)) == 160


@pytest.mark.parametrize("kwargs", [dict(max_size=0), dict(full_policy="drop")])
def test_bad_configuration(tmp_path, kwargs):
    with pytest.raises(ValueError):
        SQLiteQueue(tmp_path / "q.sqlite", **kwargs)


def test_claim_ids_claims_only_pending_records_once(tmp_path):
    from oodguard.queues.sqlite import SQLiteQueue

    queue = SQLiteQueue(tmp_path / "q.sqlite")
    ids = queue.put([record(i) for i in range(5)])
    assert queue.claim_ids(ids[:3]) == ids[:3]
    assert queue.claim_ids(ids[1:4]) == [ids[3]]  # 1 and 2 were claimed by the first call
    queue.mark_sent([ids[4]])
    assert queue.claim_ids([ids[4], "no-such-id"]) == []
    assert queue.stats().claimed == 4


def test_local_state_tells_whether_the_last_operation_failed(tmp_path, monkeypatch):
    q = SQLiteQueue(tmp_path / "q.sqlite")
    assert q.local_state() == LocalQueueState(spool_backlog=0, reachable=True)
    with monkeypatch.context() as m:
        m.setattr(sqlite_insert, "insert_batch", lambda db, *rest: db.execute("INSERT INTO nowhere VALUES (1)"))
        with pytest.raises(QueueError):
            q.put([record(1)])
    assert q.local_state() == LocalQueueState(spool_backlog=0, reachable=False)
    q.stats()
    assert q.local_state().reachable
    q.close()


def test_select_filters_by_model_version_flag_and_time(tmp_path):
    q = SQLiteQueue(tmp_path / "q.sqlite")
    check_select_filters(q)
    q.close()


def test_summary_counts_groups_from_the_index_alone(tmp_path):
    q = SQLiteQueue(tmp_path / "q.sqlite")
    check_summary(q)
    plan = q._db.execute("EXPLAIN QUERY PLAN SELECT model, version, state, flagged, COUNT(*), MIN(time), MAX(time) "
                         "FROM records GROUP BY model, version, state, flagged").fetchall()
    assert "COVERING INDEX records_group" in plan[0][-1]  # no row (no array) is read
    plan = q._db.execute("EXPLAIN QUERY PLAN SELECT seq FROM records WHERE state = 'pending' AND model = 'x' "
                         "ORDER BY seq LIMIT 5").fetchall()
    assert "records_model_state_seq" in plan[0][-1]
    q.close()


def test_delete_any_state_keeps_bytes_and_request_rows_right(tmp_path):
    path = tmp_path / "q.sqlite"
    q = SQLiteQueue(path)
    check_delete(q, lambda: len(requests_left(path)))
    q.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT COUNT(*) FROM records").fetchone()[0] == 0
        assert db.execute("SELECT value FROM counters WHERE name = 'bytes'").fetchone()[0] == 0


def test_create_false_opens_only_an_existing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "sub" / "q.sqlite")):
        SQLiteQueue(tmp_path / "sub" / "q.sqlite", create=False)
    assert not (tmp_path / "sub").exists()
    SQLiteQueue(tmp_path / "q.sqlite").close()
    q = SQLiteQueue(tmp_path / "q.sqlite", create=False)
    assert q.put([record(0)])[0] and q.stats().size == 1
    q.close()
