"""The SQLite queue's group commit: concurrent puts share one durable transaction, each batch bounded as if
alone; a failed transaction fails every caller; the unharvested count carried from put to put."""

from oodguard.queues import sqlite_insert
from oodguard.queues.sqlite import SQLiteQueue

from .store_checks import record


def test_concurrent_puts_share_one_durable_transaction(tmp_path, monkeypatch):
    import threading
    import time as clock

    from oodguard.queues.sqlite import SQLiteQueue

    queue = SQLiteQueue(tmp_path / "q.sqlite", max_size=12, full_policy="reject")
    transactions = []
    original = queue._transaction
    monkeypatch.setattr(queue, "_transaction", lambda fn: transactions.append(1) or original(fn))
    results = {}

    def put(i):
        results[i] = queue.put([record(10 * i + j) for j in range(3)])

    queue._lock.acquire()  # a commit in progress: the five puts below queue up behind it
    threads = [threading.Thread(target=put, args=(i,)) for i in range(5)]
    for t in threads:
        t.start()
    deadline = clock.monotonic() + 10
    while len(queue._pending) < 5 and clock.monotonic() < deadline:
        clock.sleep(0.01)
    queue._lock.release()
    for t in threads:
        t.join(10)
    assert len(transactions) == 1  # one fsync'd transaction for all five callers
    ids = [i for r in results.values() for i in r]
    assert len(ids) == 15 and sum(i is None for i in ids) == 3  # the bound (12) applies batch by batch
    stored = [i for i in ids if i is not None]
    assert len(set(stored)) == 12 and len(queue.get(stored)) == 12
    assert queue.stats().rejected == 3


def test_a_group_commit_evicts_batch_by_batch_as_alone_and_counts_once(tmp_path, monkeypatch):
    """Three puts in one transaction on a queue of at most 4 (evict-oldest): each batch evicts what it would
    alone, the records of the batches before it in the same transaction included; the counters add up."""
    import threading
    import time as clock

    from oodguard.queues.sqlite import SQLiteQueue

    queue = SQLiteQueue(tmp_path / "q.sqlite", max_size=4, full_policy="evict-oldest")
    queue.put([record(0)])
    transactions = []
    original = queue._transaction
    monkeypatch.setattr(queue, "_transaction", lambda fn: transactions.append(1) or original(fn))
    results = {}
    queue._lock.acquire()
    threads = []
    for i in range(1, 4):  # started one by one: the batches queue in this order
        threads.append(threading.Thread(target=lambda i=i: results.__setitem__(i, queue.put(
            [record(10 * i + j) for j in range(3)]))))
        threads[-1].start()
        deadline = clock.monotonic() + 10
        while len(queue._pending) < i and clock.monotonic() < deadline:
            clock.sleep(0.005)
    queue._lock.release()
    for t in threads:
        t.join(10)
    assert len(transactions) == 1 and all(None not in results[i] for i in (1, 2, 3))
    kept = [int(r.metadata["i"]) for r in queue.select()]
    assert kept == [22, 30, 31, 32]  # the newest four: batch 3 evicted batch 2's first two, batch 2 all of batch 1
    stats = queue.stats()
    assert (stats.size, stats.accepted, stats.evicted, stats.rejected) == (4, 10, 6, 0)
    assert stats.bytes == queue._conn().execute("SELECT SUM(bytes) FROM records").fetchone()[0] > 0


def test_a_failed_group_commit_fails_every_caller_and_stores_nothing(tmp_path, monkeypatch):
    import pytest

    from oodguard.queues.base import QueueError
    from oodguard.queues.sqlite import SQLiteQueue

    queue = SQLiteQueue(tmp_path / "q.sqlite")
    monkeypatch.setattr(sqlite_insert, "insert_batch", lambda db, *rest: db.execute("INSERT INTO nowhere VALUES (1)"))
    with pytest.raises(QueueError, match="nowhere"):
        queue.put([record(1)])
    assert queue.stats().size == 0 and queue._pending == []


def test_consecutive_puts_count_the_queue_once_and_recount_after_any_other_write(tmp_path):
    # the unharvested count (a scan of the state index, growing with the queue) is read once, then carried from
    # put to put while no other connection committed (PRAGMA data_version) and this one wrote nothing else
    from oodguard.queues.sqlite import SQLiteQueue

    path = tmp_path / "q.sqlite"
    mine, other = SQLiteQueue(path, max_size=6), SQLiteQueue(path, max_size=6)
    counts = []
    mine._db.set_trace_callback(lambda sql: counts.append(sql) if "COUNT(*)" in sql else None)
    first = mine.put([record(0), record(1)])
    assert len(counts) == 1
    assert all(mine.put([record(i)]) for i in (2, 3)) and len(counts) == 1  # carried: 4 unharvested
    taken = other.put([record(4), record(5)])  # another connection (worker, process) fills the queue to 6
    assert mine.put([record(6)]) == [None] and len(counts) == 2  # counted again: full, refused
    other.mark_sent(taken)  # and frees 2
    third = mine.put([record(7), record(8), record(9)])
    assert len(counts) == 3 and third[2] is None and all(third[:2])  # 4 + 2 = 6: the bound holds exactly
    mine.mark_sent(first)  # this connection's own other writes do not change data_version: counted again too
    assert all(mine.put([record(10), record(11)])) and len(counts) == 4
    assert mine.put([record(12)]) == [None] and len(counts) == 4
    assert mine.stats().size == other.stats().size == 6


def test_a_failed_put_leaves_no_carried_count(tmp_path, monkeypatch):
    from oodguard.queues.base import QueueError
    from oodguard.queues.sqlite import SQLiteQueue
    import pytest

    queue = SQLiteQueue(tmp_path / "q.sqlite", max_size=2)
    assert all(queue.put([record(0)]))
    real = sqlite_insert.insert_batch
    monkeypatch.setattr(sqlite_insert, "insert_batch", lambda db, *rest: (real(db, *rest), db.execute("SELECT nothing"))[0])
    with pytest.raises(QueueError):
        queue.put([record(1)])  # inserted, then rolled back: the count must not include it
    assert queue._size_seen is None
    monkeypatch.undo()
    assert all(queue.put([record(2)])) and queue.put([record(3)]) == [None] and queue.stats().size == 2
