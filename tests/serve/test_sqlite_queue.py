import threading

import numpy as np
import pytest

from oodguard.serve.queue import CLAIMED, PENDING, SENT, NewRecord, QueueError
from oodguard.serve.sqlite_queue import SQLiteQueue


def record(i: int, flagged: bool = True) -> NewRecord:
    rng = np.random.default_rng(i)
    return NewRecord(model="digits", version=1 + i % 2, input=rng.normal(size=(1, 28, 28)).astype(np.float32),
                     logits=rng.normal(size=8).astype(np.float32), features=rng.normal(size=84).astype(np.float32),
                     scores={"sisome": float(i), "energy": -1.5}, decision={"ood": flagged, "crossed": ["sisome"]},
                     flagged=flagged, request_id=f"req-{i}", metadata={"camera": "7", "i": str(i)}, time=1000.0 + i)


def assert_stored_as_put(rec, orig: NewRecord, rid: str) -> None:
    """A record read back from a queue holds everything it was put with, as the queue's pending record ``rid``."""
    assert rec.id == rid and rec.state == PENDING
    np.testing.assert_array_equal(rec.input, orig.input)
    assert rec.input.dtype == np.float32 and rec.input.shape == (1, 28, 28)
    np.testing.assert_array_equal(rec.logits, orig.logits)
    np.testing.assert_array_equal(rec.features, orig.features)
    assert rec.scores == orig.scores and rec.decision == orig.decision
    assert rec.metadata == orig.metadata and rec.request_id == orig.request_id
    assert (rec.model, rec.version, rec.flagged, rec.time) == (orig.model, orig.version, orig.flagged, orig.time)


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


def test_reject_policy_counts_and_keeps_the_oldest(tmp_path):
    q = SQLiteQueue(tmp_path / "q.sqlite", max_size=5, full_policy="reject")
    first = q.put([record(i) for i in range(4)])
    second = q.put([record(i) for i in range(4, 7)])
    assert all(first) and second[0] is not None and second[1:] == [None, None]
    s = q.stats()
    assert (s.size, s.accepted, s.rejected, s.evicted) == (5, 5, 2, 0)
    # harvested (sent) records do not count towards the bound
    assert q.mark_sent(first[:2]) == 2
    assert all(q.put([record(8), record(9)]))
    s = q.stats()
    assert (s.size, s.sent, s.rejected) == (5, 2, 2)
    assert q.purge_sent() == 2 and q.stats().sent == 0


def test_evict_oldest_policy_drops_oldest_unharvested(tmp_path):
    q = SQLiteQueue(tmp_path / "q.sqlite", max_size=3, full_policy="evict-oldest")
    a = q.put([record(i) for i in range(3)])
    claimed = q.claim(1)
    assert [r.id for r in claimed] == a[:1] and claimed[0].state == CLAIMED
    b = q.put([record(3), record(4)])
    assert all(b)
    s = q.stats()
    assert (s.size, s.evicted, s.rejected, s.claimed, s.pending) == (3, 2, 0, 1, 2)
    # the claimed record survived; the two oldest pending ones went
    assert [r.id for r in q.get(a)] == a[:1]
    # a put larger than the whole queue keeps what fits and refuses the rest (nothing pending is left to evict)
    c = q.put([record(i) for i in range(5, 9)])
    assert c.count(None) == 2 and q.stats().size == 3


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
    from oodguard.serve.sqlite_queue import SQLiteQueue

    queue = SQLiteQueue(tmp_path / "q.sqlite")
    ids = queue.put([record(i) for i in range(5)])
    assert queue.claim_ids(ids[:3]) == ids[:3]
    assert queue.claim_ids(ids[1:4]) == [ids[3]]  # 1 and 2 were claimed by the first call
    queue.mark_sent([ids[4]])
    assert queue.claim_ids([ids[4], "no-such-id"]) == []
    assert queue.stats().claimed == 4


def test_array_packing_roundtrips_shapes_and_dtypes_and_refuses_others():
    import numpy as np
    import pytest

    from oodguard.serve.queue import QueueError
    from oodguard.serve.sqlite_queue import pack_array, unpack_array

    arrays = [np.random.default_rng(0).random((1, 28, 28), dtype=np.float32), np.arange(5, dtype=np.int64),
              np.zeros((0, 3), np.uint8), np.array(2.5), np.arange(12, dtype=">f4").reshape(3, 4).T]
    for array in arrays:
        back = unpack_array(pack_array(array))
        assert back.shape == array.shape and np.array_equal(back, array)
    with pytest.raises(QueueError, match="complex"):
        pack_array(np.zeros(2, np.complex64))


def test_concurrent_puts_share_one_durable_transaction(tmp_path, monkeypatch):
    import threading
    import time as clock

    from oodguard.serve.sqlite_queue import SQLiteQueue

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


def test_a_failed_group_commit_fails_every_caller_and_stores_nothing(tmp_path, monkeypatch):
    import pytest

    from oodguard.serve.queue import QueueError
    from oodguard.serve.sqlite_queue import SQLiteQueue

    queue = SQLiteQueue(tmp_path / "q.sqlite")
    monkeypatch.setattr(queue, "_insert", lambda db, rows: db.execute("INSERT INTO nowhere VALUES (1)"))
    with pytest.raises(QueueError, match="nowhere"):
        queue.put([record(1)])
    assert queue.stats().size == 0 and queue._pending == []
