"""What the store tests share: the records they put and the checks that both stores (SQLite, Redis Streams)
must pass, each run by the store's own test files (test_sqlite*.py, test_redis_streams*.py)."""

from __future__ import annotations

import dataclasses
import json
import logging
import sqlite3
import time

import numpy as np
import pytest

from oodguard.queues.base import CLAIMED, PENDING, SENT, NewRecord
from oodguard.queues.codec import pack_array


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


def requests_left(path) -> list[str]:
    """The request ids of a SQLite queue file's request rows, oldest first."""
    with sqlite3.connect(path) as db:
        return [rid for (rid,) in db.execute("SELECT request_id FROM requests ORDER BY ref")]
