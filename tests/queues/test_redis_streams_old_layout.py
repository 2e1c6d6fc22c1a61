"""The Redis Streams queue on records the previous version stored (request inline, no byte count, no
``P:info``): read, claimed, evicted, counted, filtered and deleted."""

from __future__ import annotations

import dataclasses

from oodguard.queues.base import PENDING

from .redis_helpers import make_queue, write_old_entries
from .store_checks import assert_stored_as_put, own_bytes, record, request_bytes


def test_records_stored_by_the_previous_version_still_work(redis_server, tmp_path):
    olds = [record(0), record(1), record(2)]
    client = write_old_entries(redis_server, olds)
    q = make_queue(redis_server, tmp_path, max_size=3, full_policy="evict-oldest")
    for rec, orig, rid in zip(q.get(["old0", "old1", "old2"]), olds, ["old0", "old1", "old2"]):
        assert_stored_as_put(rec, orig, rid)
    assert [r.id for r in q.claim(1)] == ["old0"] and q.mark_sent(["old0"]) == 1 and q.purge_sent() == 1
    new = q.put([record(3), record(4)])  # evicts old1 (to make room by count; old records count 0 bytes)
    s = q.stats()
    assert (s.size, s.evicted, s.bytes) == (3, 1, sum(own_bytes(r) + request_bytes(r) for r in (record(3), record(4))))
    assert [r.id for r in q.select()] == ["old2", *new]
    client.close()
    q.close()


def test_records_of_the_previous_version_are_counted_filtered_and_deleted(redis_server, tmp_path):
    olds = [record(0), record(1), dataclasses.replace(record(2), model="cifar")]
    client = write_old_entries(redis_server, olds)
    q = make_queue(redis_server, tmp_path)
    new = q.put([record(3)])
    rows = [(r.model, r.version, r.state, r.count, r.oldest, r.newest) for r in q.summary()]
    assert rows == [("cifar", 1, PENDING, 1, 1002.0, 1002.0), ("digits", 1, PENDING, 1, 1000.0, 1000.0),
                    ("digits", 2, PENDING, 2, 1001.0, 1003.0)]
    assert [r.id for r in q.select(model="digits", version=2)] == ["old1", new[0]]
    assert [r.id for r in q.select(model="digits", since=1000.5)] == ["old1", new[0]]
    assert q.delete(["old1", "old2"]) == 2 and [r.id for r in q.select()] == ["old0", new[0]]
    assert q.stats().bytes == own_bytes(record(3)) + request_bytes(record(3))  # old records counted 0 bytes
    client.close()
    q.close()
