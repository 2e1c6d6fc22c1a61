"""The Redis Streams queue's bounds: records (reject, evict-oldest) and bytes, the request payloads shared by a
request's records and deleted with the last of them, and the lines dropped records leave."""

from __future__ import annotations

import redis

from oodguard.queues.base import CLAIMED
from oodguard.queues.redis_streams import DEFAULT_PREFIX

from .redis_helpers import make_queue, request_keys, stored_bytes, stream_ids
from .store_checks import (ALIKE_BYTES, alike, assert_one_request_read_back, big_request, check_byte_bound_evict,
                           check_byte_bound_reject, check_drop_lines, own_bytes, record)


def test_reject_policy_counts_and_survives_reopen(redis_server, tmp_path):
    q = make_queue(redis_server, tmp_path, max_size=5, full_policy="reject")
    first = q.put([record(i) for i in range(4)])
    second = q.put([record(i) for i in range(4, 7)])
    assert all(first) and second[0] is not None and second[1:] == [None, None]
    s = q.stats()
    assert (s.size, s.accepted, s.rejected, s.evicted) == (5, 5, 2, 0)
    assert q.mark_sent(first[:2]) == 2
    assert all(q.put([record(8), record(9)]))
    q.close()
    q2 = make_queue(redis_server, tmp_path, max_size=5, full_policy="reject")
    s = q2.stats()
    assert (s.size, s.sent, s.rejected, s.accepted) == (5, 2, 2, 7)
    assert q2.purge_sent() == 2 and q2.stats().sent == 0
    q2.close()


def test_evict_oldest_policy_drops_oldest_unharvested(redis_server, tmp_path):
    q = make_queue(redis_server, tmp_path, max_size=3, full_policy="evict-oldest")
    a = q.put([record(i) for i in range(3)])
    claimed = q.claim(1)
    assert [r.id for r in claimed] == a[:1] and claimed[0].state == CLAIMED
    assert all(q.put([record(3), record(4)]))
    s = q.stats()
    assert (s.size, s.evicted, s.rejected, s.claimed, s.pending) == (3, 2, 0, 1, 2)
    assert [r.id for r in q.get(a)] == a[:1]
    # nothing older is left to evict: what does not fit is refused, this call's own records are never evicted
    c = q.put([record(i) for i in range(5, 9)])
    assert c.count(None) == 2 and q.stats().size == 3
    assert stream_ids(redis_server).total() == 3
    q.close()


def test_a_request_is_stored_once_for_all_its_records(redis_server, tmp_path):
    q = make_queue(redis_server, tmp_path)
    client = redis.Redis.from_url(redis_server.url)
    originals = big_request()
    before, used_before = stored_bytes(client), client.info("memory")["used_memory"]
    ids = q.put(originals)
    grown, used_grown = stored_bytes(client) - before, client.info("memory")["used_memory"] - used_before
    own = sum(own_bytes(r) for r in originals)
    payload = client.memory_usage(f"{DEFAULT_PREFIX}:req:{ids[0]}")
    print(f"redis: 64 records with 1 MB metadata grew the keys by {grown} bytes, used_memory by {used_grown} "
          f"(request key {payload}, records' own bytes {own})")
    assert 1_000_000 < payload < 1_100_000
    assert 1_000_000 < grown < 1_000_000 + 3 * own  # one copy of the metadata (it was 64: > 64 MB)
    assert request_keys(redis_server) == {f"{DEFAULT_PREFIX}:req:{ids[0]}": 64}
    assert_one_request_read_back(q, originals, ids)
    client.close()
    q.close()


def test_request_payloads_go_with_their_last_record(redis_server, tmp_path):
    q = make_queue(redis_server, tmp_path, max_size=4, full_policy="evict-oldest")
    a = q.put([alike(0)] * 2)
    b = q.put([alike(1)] * 2)
    key = f"{DEFAULT_PREFIX}:req:"
    assert request_keys(redis_server) == {key + a[0]: 2, key + b[0]: 2}
    c = q.put([alike(2)])  # evicts a[0]: request r000 keeps a[1]
    assert request_keys(redis_server) == {key + a[0]: 1, key + b[0]: 2, key + c[0]: 1}
    assert [r.request_id for r in q.get(a)] == ["r000"]
    d = q.put([alike(3)])  # evicts a[1], the last record of r000
    assert request_keys(redis_server) == {key + b[0]: 2, key + c[0]: 1, key + d[0]: 1}
    assert q.mark_sent(b[:1]) == 1 and q.purge_sent() == 1
    assert request_keys(redis_server) == {key + b[0]: 1, key + c[0]: 1, key + d[0]: 1}
    assert q.mark_sent(b[1:]) == 1 and q.purge_sent() == 1
    assert request_keys(redis_server) == {key + c[0]: 1, key + d[0]: 1}
    q.close()


def test_byte_bound_under_reject(redis_server, tmp_path):
    q = make_queue(redis_server, tmp_path, max_bytes=3 * ALIKE_BYTES, full_policy="reject")
    check_byte_bound_reject(q)
    q.close()


def test_byte_bound_under_evict_oldest(redis_server, tmp_path):
    q = make_queue(redis_server, tmp_path, max_bytes=3 * ALIKE_BYTES + ALIKE_BYTES // 2, full_policy="evict-oldest")
    check_byte_bound_evict(q)
    q.close()


def test_evictions_and_refusals_leave_rate_limited_lines(redis_server, tmp_path, caplog):
    made = []

    def make(policy):
        made.append(make_queue(redis_server, tmp_path, spool=f"spool{len(made)}", max_size=2, full_policy=policy,
                               key_prefix=f"q{len(made)}"))
        return made[-1]

    check_drop_lines(make, caplog, "oodguard.queues.redis_streams")
