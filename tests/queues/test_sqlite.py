import dataclasses
import json
import logging
import sqlite3
import threading
import time

import numpy as np
import pytest

from oodguard.queues.base import CLAIMED, PENDING, SENT, LocalQueueState, NewRecord, QueueError
from oodguard.queues import sqlite_insert
from oodguard.queues.codec import pack_array
from oodguard.queues.sqlite import SQLiteQueue


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


def assert_one_request_read_back(q, originals: list[NewRecord], ids: list[str]) -> None:
    """Records of one request (stored once) read back each with the request's id and its own metadata dict;
    the bytes counter holds the records' own bytes plus one request row."""
    assert q.stats().bytes == sum(own_bytes(r) for r in originals) + request_bytes(originals[0])
    got = q.get(ids)
    assert len(got) == len(originals)
    for orig, rec, rid in zip(originals, got, ids):
        assert_stored_as_put(rec, orig, rid)
    got[0].metadata["camera"] = "changed"  # each record has its own dict
    assert got[1].metadata == originals[1].metadata
    assert [r.metadata for r in q.claim(len(ids))] == [originals[0].metadata] * len(ids)


def own_bytes(r: NewRecord) -> int:
    """What a record counts towards ``max_bytes`` without its request: packed arrays + scores/decision JSON."""
    return (sum(len(pack_array(a)) for a in (r.input, r.logits, r.features))
            + len(json.dumps({k: float(v) for k, v in r.scores.items()})) + len(json.dumps(r.decision)))


def request_bytes(r: NewRecord) -> int:
    """What a request row adds, once, to the first of its records that is stored."""
    return len(r.request_id.encode()) + len(json.dumps(r.metadata))


def alike(i: int) -> NewRecord:
    """record(0)'s content under a request of its own: every alike record counts the same bytes."""
    return dataclasses.replace(record(0), request_id=f"r{i:03d}", metadata={"i": f"{i:03d}"})


ALIKE_BYTES = own_bytes(alike(0)) + request_bytes(alike(0))


def big_request(n: int = 64) -> list[NewRecord]:
    """``n`` records of one request whose metadata holds 1 MB of incompressible text (one dict, as the
    gateway passes it)."""
    metadata = {"camera": "7", "blob": np.random.default_rng(0).bytes(500_000).hex()}
    return [dataclasses.replace(record(i), request_id="req-big", metadata=metadata) for i in range(n)]


def check_byte_bound_reject(q) -> None:
    """``q``: an empty queue, policy reject, room for 3 alike records by bytes (far more by count)."""
    assert q.max_bytes == 3 * ALIKE_BYTES and q.max_size >= 10
    ids = q.put([alike(i) for i in range(5)])
    assert all(ids[:3]) and ids[3:] == [None, None]
    s = q.stats()
    assert (s.size, s.bytes, s.max_bytes, s.accepted, s.rejected) == (3, 3 * ALIKE_BYTES, 3 * ALIKE_BYTES, 3, 2)
    # claimed records still count, released ones too; sent ones stop counting
    assert [r.id for r in q.claim(2)] == ids[:2] and q.stats().bytes == 3 * ALIKE_BYTES
    assert q.release([ids[1]]) == 1 and q.stats().bytes == 3 * ALIKE_BYTES
    assert q.mark_sent([ids[0]]) == 1 and q.stats().bytes == 2 * ALIKE_BYTES
    assert q.mark_sent([ids[0]]) == 0 and q.stats().bytes == 2 * ALIKE_BYTES
    more = q.put([alike(5), alike(6)])
    assert more[0] and more[1] is None
    s = q.stats()
    assert (s.size, s.sent, s.bytes, s.accepted, s.rejected) == (3, 1, 3 * ALIKE_BYTES, 4, 3)
    assert q.purge_sent() == 1 and q.stats().bytes == 3 * ALIKE_BYTES


def check_byte_bound_evict(q) -> None:
    """``q``: an empty queue, policy evict-oldest, room for 3.5 alike records by bytes (far more by count)."""
    assert q.max_bytes == 3 * ALIKE_BYTES + ALIKE_BYTES // 2 and q.max_size >= 10
    a = q.put([alike(i) for i in range(3)])
    assert [r.id for r in q.claim(1)] == a[:1]
    b = q.put([alike(3), alike(4)])  # each evicts the oldest pending record
    assert all(b)
    s = q.stats()
    assert (s.size, s.bytes, s.evicted, s.rejected, s.claimed) == (3, 3 * ALIKE_BYTES, 2, 0, 1)
    assert [r.id for r in q.get(a + b)] == a[:1] + b
    # a record larger than max_bytes is refused and evicts nothing
    big = dataclasses.replace(alike(5), input=np.random.default_rng(5).normal(size=(1, 128, 128)).astype(np.float32))
    assert own_bytes(big) > q.max_bytes
    assert q.put([big]) == [None]
    s = q.stats()
    assert (s.size, s.bytes, s.evicted, s.rejected) == (3, 3 * ALIKE_BYTES, 2, 1)
    assert q.mark_sent(b) == 2 and q.stats().bytes == ALIKE_BYTES


def check_drop_lines(make, caplog, logger: str) -> None:
    """``make(policy)``: an empty queue with max_size 2. Evictions and refusals leave rate-limited lines."""
    def lines(word: str) -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == logger and word in r.getMessage()]

    caplog.set_level(logging.WARNING, logger=logger)
    q = make("evict-oldest")
    q._drops.interval_s = 60  # the whole burst falls within one interval
    first = q.put([alike(0), alike(1)])
    burst = [q.put([alike(i)])[0] for i in range(2, 12)]  # each put evicts one record
    assert len(lines("evicted")) == 1
    assert f"evicted 1 pending record(s) to make room (first ids: {first[0]})" in lines("evicted")[0]
    q._drops.interval_s = 0  # the interval is over: the next eviction's line counts the held ones too
    q.put([alike(12)])
    shown = ", ".join([first[1]] + burst[:4])  # the first five of the ten held back
    assert len(lines("evicted")) == 2
    assert f"evicted 10 pending record(s) to make room (first ids: {shown})" in lines("evicted")[1]
    assert q.stats().evicted == 11
    q.close()
    q = make("reject")
    q._drops.interval_s = 60
    q.put([alike(0), alike(1)])
    for i in range(2, 9):
        assert q.put([alike(i), alike(i)]) == [None, None]
    assert len(lines("refused")) == 1 and "refused 2 record(s) (first requests: r002)" in lines("refused")[0]
    q.close()  # what was held back is written at close
    assert len(lines("refused")) == 2
    assert "refused 12 record(s) (first requests: r003, r004, r005, r006, r007)" in lines("refused")[1]


def varied() -> list[NewRecord]:
    """Records of two models and several versions, flagged and sampled, each its own request; record 6 is
    the oldest by time but stored last."""
    shape = [("digits", 1, True), ("digits", 1, False), ("digits", 2, True), ("cifar", 1, True), ("digits", 2, True),
             ("cifar", 3, False), ("digits", 2, True)]
    out = [dataclasses.replace(record(i), model=m, version=v, flagged=f) for i, (m, v, f) in enumerate(shape)]
    out[6].time = 990.0
    return out


def check_select_filters(q) -> None:
    """``q``: an empty queue. select filters by model, version, flag and time (since <= time < until)."""
    originals = varied()
    ids = q.put(originals)

    def picked(**filters) -> list[int]:
        return [ids.index(r.id) for r in q.select(**filters)]

    assert picked() == [0, 1, 2, 3, 4, 5, 6]
    assert picked(model="digits") == [0, 1, 2, 4, 6]
    assert picked(model="digits", version=2) == [2, 4, 6]
    assert picked(model="digits", flagged=True) == [0, 2, 4, 6]
    assert picked(model="cifar", flagged=False) == [5]
    assert picked(version=1) == [0, 1, 3]
    assert picked(model="cifar", version=1) == [3]
    assert picked(model="nope") == [] and picked(model="digits", version=7) == []
    assert picked(since=1002.0) == [2, 3, 4, 5]  # record 6 is older than its seq
    assert picked(until=1002.0) == [0, 1, 6]
    assert picked(since=1001.0, until=1004.0) == [1, 2, 3]
    assert picked(since=1002.0, until=1002.0) == []
    assert picked(model="digits", limit=2) == [0, 1] and picked(model="digits", version=2, limit=2) == [2, 4]
    assert picked(model="digits", limit=0) == []
    assert_stored_as_put(q.select(model="cifar", version=3)[0], originals[5], ids[5])
    assert q.claim_ids([ids[2], ids[3]]) == [ids[2], ids[3]]
    assert picked(model="digits") == [0, 1, 4, 6] and picked(state=CLAIMED, model="digits") == [2]
    assert picked(state=CLAIMED, until=1003.0) == [2] and picked(state=SENT, model="digits") == []
    with pytest.raises(ValueError):
        q.select(state="lost", model="digits")


def check_summary(q) -> None:
    """``q``: an empty queue. summary counts by (model, version, state, flagged) with oldest / newest times."""
    assert q.summary() == []
    ids = q.put(varied())
    q.claim_ids([ids[2]])
    q.mark_sent([ids[0]])
    rows = [(r.model, r.version, r.state, r.flagged, r.count, r.oldest, r.newest) for r in q.summary()]
    assert rows == [
        ("cifar", 1, PENDING, True, 1, 1003.0, 1003.0),
        ("cifar", 3, PENDING, False, 1, 1005.0, 1005.0),
        ("digits", 1, PENDING, False, 1, 1001.0, 1001.0),
        ("digits", 1, SENT, True, 1, 1000.0, 1000.0),
        ("digits", 2, CLAIMED, True, 1, 1002.0, 1002.0),
        ("digits", 2, PENDING, True, 2, 990.0, 1004.0),
    ]
    assert sum(r.count for r in q.summary()) == q.stats().size + q.stats().sent == 7


def check_delete(q, requests_left) -> None:
    """``q``: an empty queue; ``requests_left()``: how many request rows / payloads it stores. delete removes
    records in any state, keeps the byte counter right, drops request rows with their last record and counts
    neither as evicted nor as sent."""
    originals = varied()
    ids = q.put(originals)
    metadata = {"camera": "9"}
    pair = [dataclasses.replace(record(10), request_id="shared", metadata=metadata),
            dataclasses.replace(record(11), request_id="shared", metadata=metadata)]
    pair_ids = q.put(pair)
    assert requests_left() == 8
    q.claim_ids([ids[1]])
    q.mark_sent([ids[2]])
    before = q.stats()
    assert q.delete([]) == 0
    assert q.delete([ids[0], ids[1], ids[2], "no-such-id", ids[0]]) == 3  # pending, claimed, sent
    s = q.stats()
    freed = sum(own_bytes(r) + request_bytes(r) for r in originals[:2])  # the sent one no longer counted
    assert (s.size, s.pending, s.claimed, s.sent) == (before.size - 2, before.pending - 1, 0, 0)
    assert (s.accepted, s.evicted, s.rejected, s.bytes) == (before.accepted, 0, 0, before.bytes - freed)
    assert q.get(ids[:3]) == [] and requests_left() == 5
    assert q.delete(ids[:3]) == 0
    # the first record of a request carries its bytes; the request row stays for the second
    assert q.delete(pair_ids[:1]) == 1 and requests_left() == 5
    assert q.stats().bytes == before.bytes - freed - own_bytes(pair[0]) - request_bytes(pair[0])
    kept = q.get(pair_ids[1:])[0]
    assert (kept.request_id, kept.metadata) == ("shared", metadata)
    assert q.delete(pair_ids[1:]) == 1 and requests_left() == 4
    rest = originals[3:]
    assert q.stats().bytes == sum(own_bytes(r) + request_bytes(r) for r in rest)
    assert [r.id for r in q.select()] == ids[3:] and q.purge_sent() == 0
    assert q.delete(ids[3:]) == 4
    s = q.stats()
    assert (s.size, s.sent, s.bytes, s.evicted, s.accepted) == (0, 0, 0, 0, 9) and q.summary() == []
    assert requests_left() == 0


def retried(request_id: str, items=(0, 2, 5), model: str = "digits", seed: int = 0) -> list[NewRecord]:
    """The records the gateway queues for items ``items`` of one request (``decision["item"]``: their
    positions), one metadata dict for all; ``seed`` picks the inputs."""
    metadata = {"camera": "7"}
    return [dataclasses.replace(record(seed + item), model=model, request_id=request_id, metadata=metadata,
                                decision={"ood": True, "crossed": ["sisome"], "item": item}) for item in items]


def check_retried_requests_are_stored_once(q) -> None:
    """``q``: an empty queue with a long idempotency window. A request put again (same model, request id, item
    positions and inputs) stores nothing and gets the earlier ids, item for item; anything else is stored."""
    first = q.put(retried("r1"))
    assert all(first) and len(set(first)) == 3
    assert q.put(retried("r1")) == first
    assert q.put(retried("r1", items=(5, 0))) == [first[2], first[0]]  # fewer items, other order: item for item
    s = q.stats()
    assert (s.size, s.accepted) == (3, 3)
    # not retries: another request id, none, another model, other inputs, an item position not stored before
    fresh = [q.put(retried("r2")), q.put(retried("")), q.put(retried(""))] + [q.put(retried("r1", model="cifar"))]
    fresh += [q.put(retried("r1", seed=100)), q.put(retried("r1", items=(0, 2, 7)))]
    ids = [i for put in fresh for i in put]
    assert all(ids) and len(set(ids)) == len(ids) and set(ids).isdisjoint(first)
    assert q.stats().size == 3 + len(ids)
    assert q.put(retried("r2")) == fresh[0]
    assert q.put(retried("r1", model="cifar")) == fresh[3]
    # the latest records of a request id answer for it: item 0 is now the one stored with items (0, 2, 7)
    assert q.put(retried("r1", items=(0, 2, 7))) == fresh[5]
    # a request and its copy in one put: the copy gets the first's ids
    both = q.put(retried("r3") + retried("r3"))
    assert both[3:] == both[:3] and len(set(both)) == 3
    # records that are gone (harvested, purged) answer for no retry: it is stored again
    assert q.mark_sent(fresh[0]) == 3 and q.purge_sent() == 3
    again = q.put(retried("r2"))
    assert all(again) and set(again).isdisjoint(fresh[0]) and q.put(retried("r2")) == again
    assert [r.id for r in q.get(again)] == again and [r.decision["item"] for r in q.get(again)] == [0, 2, 5]


def check_the_retry_window(make) -> None:
    """``make(window_s)``: an empty queue with that idempotency window. After the window, or with 0, a request put
    again is stored again."""
    q = make(600.0)  # a window no test run outlasts: the retry is answered from the first put
    first = q.put(retried("r1"))
    assert q.put(retried("r1")) == first and q.stats().size == 3
    q.close()
    q = make(0.5)
    first = q.put(retried("r1"))
    time.sleep(0.6)  # past the window (a loaded machine only sleeps longer)
    later = q.put(retried("r1"))
    assert all(later) and set(later).isdisjoint(first) and q.stats().size == 6
    q.close()
    q = make(0)
    first = q.put(retried("r1"))
    second = q.put(retried("r1"))
    assert all(second) and set(second).isdisjoint(first) and q.stats().size == 6
    q.close()


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
    from oodguard.queues.sqlite import SQLiteQueue

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

    from oodguard.queues.base import QueueError
    from oodguard.queues.codec import pack_array, unpack_array

    arrays = [np.random.default_rng(0).random((1, 28, 28), dtype=np.float32), np.arange(5, dtype=np.int64),
              np.zeros((0, 3), np.uint8), np.array(2.5), np.arange(12, dtype=">f4").reshape(3, 4).T]
    for array in arrays:
        back = unpack_array(pack_array(array))
        assert back.shape == array.shape and np.array_equal(back, array)
    with pytest.raises(QueueError, match="complex"):
        pack_array(np.zeros(2, np.complex64))


def test_stored_zlib_is_what_zlib_writes_at_level_0_and_any_zlib_reads():
    import zlib

    import numpy as np

    from oodguard.queues.codec import STORED_BLOCK, stored_zlib, unpack_array

    rng = np.random.default_rng(1)
    for size in (0, 1, 3148, 60_000):
        data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
        assert stored_zlib(data) == zlib.compress(data, 0)  # byte for byte at a record's sizes
    for size in (STORED_BLOCK - 1, STORED_BLOCK, STORED_BLOCK + 1, 3 * STORED_BLOCK, 200_000):  # several blocks: the last one marked final
        data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
        blob = stored_zlib(data)
        assert zlib.decompress(blob) == data and len(blob) == size + 6 + 5 * -(-size // STORED_BLOCK)
    # rows an older gateway deflated (level 6) still unpack
    header = bytes([0, 2]) + np.array([2, 3], "<u4").tobytes()
    values = np.arange(6, dtype="<f4")
    old = zlib.compress(header + values.tobytes(), 6)
    assert np.array_equal(unpack_array(old), values.reshape(2, 3))


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


def test_a_request_is_stored_once_for_all_its_records(tmp_path):
    path = tmp_path / "q.sqlite"
    SQLiteQueue(path).close()  # close checkpoints the WAL into the file: its size is what is stored
    empty = path.stat().st_size
    originals = big_request()
    q = SQLiteQueue(path)
    ids = q.put(originals)
    q.close()
    grown = path.stat().st_size - empty
    own = sum(own_bytes(r) for r in originals)
    print(f"sqlite: 64 records with 1 MB metadata grew the file by {grown} bytes (records' own bytes {own})")
    assert 1_000_000 < grown < 1_000_000 + 3 * own  # one copy of the metadata (it was 64: > 64 MB)
    q = SQLiteQueue(path)
    assert_one_request_read_back(q, originals, ids)
    q.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT COUNT(*) FROM requests").fetchone()[0] == 1
        assert db.execute("SELECT COUNT(DISTINCT request_ref) FROM records").fetchone()[0] == 1


def requests_left(path) -> list[str]:
    with sqlite3.connect(path) as db:
        return [rid for (rid,) in db.execute("SELECT request_id FROM requests ORDER BY ref")]


def test_request_rows_go_with_their_last_record(tmp_path):
    path = tmp_path / "q.sqlite"
    q = SQLiteQueue(path, max_size=4, full_policy="evict-oldest")
    a = q.put([alike(0)] * 2)
    q.put([alike(1)] * 2)
    assert requests_left(path) == ["r000", "r001"]
    q.put([alike(2)])  # evicts a[0]: request r000 keeps a[1]
    assert requests_left(path) == ["r000", "r001", "r002"] and [r.request_id for r in q.get(a)] == ["r000"]
    q.put([alike(3)])  # evicts a[1], the last record of r000
    assert requests_left(path) == ["r001", "r002", "r003"]
    b = [r.id for r in q.select(limit=2)]  # r001's records
    assert q.mark_sent(b[:1]) == 1 and q.purge_sent() == 1
    assert requests_left(path) == ["r001", "r002", "r003"]
    assert q.mark_sent(b[1:]) == 1 and q.purge_sent() == 1
    assert requests_left(path) == ["r002", "r003"]
    q.close()


def test_byte_bound_under_reject(tmp_path):
    q = SQLiteQueue(tmp_path / "q.sqlite", max_bytes=3 * ALIKE_BYTES, full_policy="reject")
    check_byte_bound_reject(q)
    q.close()


def test_byte_bound_under_evict_oldest(tmp_path):
    q = SQLiteQueue(tmp_path / "q.sqlite", max_bytes=3 * ALIKE_BYTES + ALIKE_BYTES // 2, full_policy="evict-oldest")
    check_byte_bound_evict(q)
    q.close()


def test_the_byte_counter_matches_the_rows_and_survives_reopen(tmp_path):
    path = tmp_path / "q.sqlite"
    q = SQLiteQueue(path, max_size=6, full_policy="evict-oldest")
    ids = [i for n in range(4) for i in q.put(big_request(3)[:1] + [alike(n), alike(n)])]
    q.claim(2)
    q.release(ids[:1])
    q.mark_sent(ids[-4:-1])
    expected = q.stats().bytes
    q.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT SUM(bytes) FROM records WHERE state != 'sent'").fetchone()[0] == expected
    assert SQLiteQueue(path).stats().bytes == expected > 0


def test_evictions_and_refusals_leave_rate_limited_lines(tmp_path, caplog):
    made = []

    def make(policy):
        made.append(SQLiteQueue(tmp_path / f"q{len(made)}.sqlite", max_size=2, full_policy=policy))
        return made[-1]

    check_drop_lines(make, caplog, "oodguard.queues.sqlite")


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


def test_the_byte_counter_matches_the_rows_after_deletes(tmp_path):
    path = tmp_path / "q.sqlite"
    q = SQLiteQueue(path, max_size=6, full_policy="evict-oldest")
    ids = [i for n in range(4) for i in q.put(big_request(3)[:1] + [alike(n), alike(n)])]
    q.claim(2)
    q.mark_sent(ids[-4:-1])
    assert q.delete(ids[::2]) == 3  # some of them were evicted already
    expected = q.stats().bytes
    q.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT SUM(bytes) FROM records WHERE state != 'sent'").fetchone()[0] == expected
    q = SQLiteQueue(path)
    assert q.stats().bytes == expected > 0 and q.stats().evicted == 6
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


def test_create_false_opens_only_an_existing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "sub" / "q.sqlite")):
        SQLiteQueue(tmp_path / "sub" / "q.sqlite", create=False)
    assert not (tmp_path / "sub").exists()
    SQLiteQueue(tmp_path / "q.sqlite").close()
    q = SQLiteQueue(tmp_path / "q.sqlite", create=False)
    assert q.put([record(0)])[0] and q.stats().size == 1
    q.close()


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
