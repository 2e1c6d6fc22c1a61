"""The Redis Streams queue against a real redis-server: records, bound, claims, and the spool that keeps
records while Redis is down (exactly once after replay, across a process restart)."""

from __future__ import annotations

import collections
import dataclasses
import json
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from oodguard.queues.base import CLAIMED, PENDING, SENT, LocalQueueState, QueueError
from oodguard.queues.factory import open_queue, split_redis_url
from oodguard.queues import redis_entries
from oodguard.queues.redis_entries import encode_records
from oodguard.queues.redis_streams import DEFAULT_PREFIX, RedisQueue
from oodguard.serve.settings import Settings, SettingsError
from oodguard.queues.codec import pack_array
from oodguard.queues.sqlite import SQLiteQueue

from .test_sqlite import (ALIKE_BYTES, alike, assert_one_request_read_back, assert_stored_as_put, big_request, check_byte_bound_evict,
                                check_byte_bound_reject, check_delete, check_drop_lines, check_retried_requests_are_stored_once,
                                check_select_filters, check_summary, check_the_retry_window, own_bytes, record, request_bytes,
                                retried, varied)


def make_queue(server, tmp_path, spool: str = "spool", **kwargs) -> RedisQueue:
    return RedisQueue(server.url, tmp_path / spool, connect_retry_s=0.1, **kwargs)


def stream_ids(server, prefix: str = DEFAULT_PREFIX) -> collections.Counter:
    client = redis.Redis.from_url(server.url)
    try:
        return collections.Counter(fields[b"id"].decode() for _, fields in client.xrange(f"{prefix}:stream"))
    finally:
        client.close()


def wait_for(condition, timeout_s: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def write_old_entries(redis_server, olds) -> redis.Redis:
    """Store ``olds`` as ids old0, old1, ... the way the put script before request rows wrote them (request id
    and metadata inline, no byte count); returns the client."""
    client = redis.Redis.from_url(redis_server.url)
    for seq, (r, rid) in enumerate(zip(olds, [f"old{i}" for i in range(len(olds))]), start=1):
        fields = {"seq": str(seq), "id": rid, "time": repr(r.time), "model": r.model, "version": str(r.version),
                  "flagged": "1", "request_id": r.request_id, "metadata": json.dumps(r.metadata),
                  "scores": json.dumps(r.scores), "decision": json.dumps(r.decision), "logits": pack_array(r.logits),
                  "features": pack_array(r.features), "input": pack_array(r.input)}
        client.xadd(f"{DEFAULT_PREFIX}:stream", fields, id=f"{seq}-0")
        client.hset(f"{DEFAULT_PREFIX}:rec", rid, f"{seq}:1:pending")
        client.zadd(f"{DEFAULT_PREFIX}:z:pending:1", {rid: seq})
        client.sadd(f"{DEFAULT_PREFIX}:seen", rid)
    client.set(f"{DEFAULT_PREFIX}:seq", len(olds))
    return client


def test_roundtrip_of_arrays_metadata_and_large_inputs(redis_server, tmp_path):
    # inline_max_bytes=2000: the (incompressible) 28x28 float input goes to its own key, logits stay inline
    q = make_queue(redis_server, tmp_path, inline_max_bytes=2000)
    originals = [record(0), record(1, flagged=False)]
    ids = q.put(originals)
    assert len(ids) == 2 and all(isinstance(i, str) and i for i in ids)
    got = q.get(list(reversed(ids)))[::-1]
    for orig, rec, rid in zip(originals, got, ids):
        assert_stored_as_put(rec, orig, rid)
    assert [r.seq for r in got] == [1, 2]
    client = redis.Redis.from_url(redis_server.url)
    entry = client.xrange(f"{DEFAULT_PREFIX}:stream", "1-0", "1-0")[0][1]
    assert entry[b"id"].decode() == ids[0] and entry[b"input_ref"] == b"1" and b"input" not in entry
    # its request lives in its own key (named after the request's first record), referenced once
    assert entry[b"req"].decode() == ids[0] and b"metadata" not in entry
    payload = client.hgetall(f"{DEFAULT_PREFIX}:req:{ids[0]}")
    assert json.loads(payload[b"metadata"]) == originals[0].metadata and payload[b"refs"] == b"1"
    assert client.exists(f"{DEFAULT_PREFIX}:blob:{ids[0]}")
    s = q.stats()
    assert (s.size, s.pending, s.flagged, s.sampled, s.accepted, s.spool_backlog) == (2, 2, 1, 1, 2, 0)
    # the blob goes with its record
    assert q.mark_sent(ids) == 2 and q.purge_sent() == 2
    assert not client.exists(f"{DEFAULT_PREFIX}:blob:{ids[0]}") and client.xlen(f"{DEFAULT_PREFIX}:stream") == 0
    assert not client.keys(f"{DEFAULT_PREFIX}:req:*")
    client.close()
    q.close()
    with pytest.raises(QueueError, match="closed"):
        q.put([record(3)])


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


def test_claim_select_release_mark_sent(redis_server, tmp_path):
    q = make_queue(redis_server, tmp_path)
    ids = q.put([record(0), record(1, flagged=False), record(2), record(3)])
    assert [r.id for r in q.select(flagged=False)] == [ids[1]]
    assert [r.id for r in q.select(limit=2)] == ids[:2]
    assert [r.id for r in q.claim(2, flagged=True)] == [ids[0], ids[2]]
    assert [r.id for r in q.claim(5, flagged=True)] == [ids[3]]
    assert q.claim(5, flagged=True) == []
    assert q.release([ids[2]]) == 1 and q.release([ids[2]]) == 0
    assert q.mark_sent([ids[0], ids[1]]) == 2
    assert [r.id for r in q.select(state=SENT)] == [ids[0], ids[1]]
    assert [r.id for r in q.select(state=PENDING)] == [ids[2]]
    assert [r.id for r in q.claim(5)] == [ids[2]]
    more = q.put([record(4), record(5)])
    assert q.claim_ids([more[0], ids[2], "no-such-id"]) == [more[0]]  # ids[2] is claimed already
    assert q.claim_ids([more[0], more[1]]) == [more[1]] and q.stats().claimed == 4
    with pytest.raises(ValueError):
        q.select(state="lost")
    q.close()


CLAIMER = """
import json, sys
from oodguard.queues.redis_streams import RedisQueue
q = RedisQueue(sys.argv[1], sys.argv[2])
got = []
while True:
    batch = q.claim(3)
    if not batch:
        break
    got += [r.id for r in batch]
q.close()
print(json.dumps(got))
"""


def test_concurrent_claims_never_return_a_record_twice(redis_server, tmp_path):
    q = make_queue(redis_server, tmp_path)
    ids = [i for start in range(0, 300, 50) for i in q.put([record(j) for j in range(start, start + 50)])]
    assert len(set(ids)) == 300
    # another process and two threads (each with its own connections) claim at the same time
    proc = subprocess.Popen([sys.executable, "-c", CLAIMER, redis_server.url, str(tmp_path / "spool-proc")],
                            stdout=subprocess.PIPE, text=True)
    results: dict[int, list[str]] = {}

    def harvest(n: int) -> None:
        mine = make_queue(redis_server, tmp_path, spool=f"spool{n}")
        got: list[str] = []
        while batch := mine.claim(2):
            got += [r.id for r in batch]
        results[n] = got
        mine.close()

    threads = [threading.Thread(target=harvest, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    out, _ = proc.communicate(timeout=60)
    claimed = results[0] + results[1] + json.loads(out)
    assert len(claimed) == 300 and sorted(claimed) == sorted(ids)
    s = q.stats()
    assert (s.pending, s.claimed) == (0, 300)
    q.close()


def test_spool_while_redis_is_down_then_replay_exactly_once(redis_server, tmp_path):
    q = make_queue(redis_server, tmp_path)
    before = q.put([record(0)])
    redis_server.stop()
    spooled = []
    for i in range(1, 6):
        ids = q.put([record(i), record(i + 10, flagged=False)])
        assert all(ids)
        spooled += ids
    assert q.spool.backlog == 10 and (tmp_path / "spool").stat().st_size > 0
    with pytest.raises(QueueError):
        q.stats()
    # a record that was written *and* spooled (the connection broke after Redis ran the script): lands once
    redis_server.start()
    both, requests = encode_records([record(99)], ["written-and-spooled"], time.time(), q.inline_max_bytes)
    assert q._run_put(both, requests, admit=False) == [1]
    q.spool.append(both, requests)
    wait_for(lambda: q.spool.backlog == 0, what="the spool to drain")
    assert (tmp_path / "spool").stat().st_size == 0
    counts = stream_ids(redis_server)
    assert set(counts) == set(before + spooled + ["written-and-spooled"]) and max(counts.values()) == 1
    assert q.replayed == 10 and q.replay_duplicates == 1
    assert [r.id for r in q.get(spooled)] == spooled
    s = q.stats()
    assert (s.size, s.accepted, s.flagged, s.sampled, s.spool_backlog) == (12, 12, 7, 5, 0)
    q.close()


def test_replayed_records_are_admitted_beyond_a_full_reject_queue(redis_server, tmp_path):
    q = make_queue(redis_server, tmp_path, max_size=2, full_policy="reject")
    redis_server.stop()
    ids = q.put([record(i) for i in range(3)])  # acknowledged while down: Redis cannot refuse them later
    redis_server.start()
    wait_for(lambda: q.spool.backlog == 0, what="the spool to drain")
    assert [r.id for r in q.get(ids)] == ids
    assert q.put([record(5)]) == [None]  # the bound holds for new records
    q.close()


WRITER = """
import json, os, sys
from oodguard.queues.redis_streams import RedisQueue
sys.path.insert(0, sys.argv[3])
from test_sqlite import record
q = RedisQueue(sys.argv[1], sys.argv[2])
ids = [i for n in range(4) for i in q.put([record(10 * n + j) for j in range(5)])]
print(json.dumps(ids), flush=True)
os._exit(0)  # no close(): as if the process died right after the puts returned
"""


def test_spool_survives_a_process_restart_and_drops_a_torn_tail(redis_server, tmp_path):
    spool = tmp_path / "spool"
    redis_server.stop()
    run = subprocess.run([sys.executable, "-c", WRITER, redis_server.url, str(spool), str(Path(__file__).parent)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    ids = json.loads(run.stdout)
    assert len(set(ids)) == 20 and spool.stat().st_size > 0
    with open(spool, "ab") as f:  # a frame cut short by a crash (its put never returned)
        f.write(b"OGSP\xff\x00\x00\x00\x01\x02")
    redis_server.start()
    q = make_queue(redis_server, tmp_path)  # replays at start-up
    wait_for(lambda: q.spool.backlog == 0, what="the start-up replay")
    counts = stream_ids(redis_server)
    assert sorted(counts) == sorted(ids) and set(counts.values()) == {1}
    assert spool.stat().st_size == 0
    q.close()


def test_open_queue_urls_and_settings(redis_server, tmp_path):
    q = open_queue(f"sqlite:///{tmp_path / 'q.sqlite'}", max_size=7, max_bytes=5000)  # sqlite:////tmp/...: absolute
    assert isinstance(q, SQLiteQueue) and q.path == tmp_path / "q.sqlite" and (q.max_size, q.max_bytes) == (7, 5000)
    q.close()
    q = open_queue(redis_server.url + "?key_prefix=test:q&inline_max_bytes=10&socket_timeout=3",
                   spool_path=tmp_path / "spool", full_policy="evict-oldest", max_bytes=6000)
    assert isinstance(q, RedisQueue) and (q.key_prefix, q.inline_max_bytes, q.full_policy) == ("test:q", 10, "evict-oldest")
    assert q.max_bytes == 6000 and q.stats().max_bytes == 6000
    assert q.put([record(0)])[0] in stream_ids(redis_server, "test:q")
    q.close()
    assert split_redis_url("redis://h:1/2?spool=/x&socket_timeout=3") == ("redis://h:1/2?socket_timeout=3", {"spool": "/x"})
    with pytest.raises(ValueError, match="expected sqlite"):
        open_queue("mysql://x")
    s = Settings.from_sources({"repository": "r"}, {"OODGUARD_QUEUE_URL": "redis://127.0.0.1:1/0",
                                                    "OODGUARD_QUEUE_SPOOL_PATH": "/tmp/s"})
    assert s.effective_queue_url == "redis://127.0.0.1:1/0" and s.queue_spool_path == Path("/tmp/s")
    assert Settings.from_sources({"repository": "r", "queue_path": "/a/q.sqlite"}, {}).effective_queue_url == "sqlite:////a/q.sqlite"
    assert Settings.from_sources({"repository": "r", "queue_path": "q.sqlite"}, {}).effective_queue_url == "sqlite:///q.sqlite"
    with pytest.raises(SettingsError, match="OODGUARD_QUEUE_URL"):
        Settings.from_sources({"repository": "r", "queue_url": "memcache://x"}, {})


def request_keys(server, prefix: str = DEFAULT_PREFIX) -> dict[str, int]:
    """Request payload key -> its reference count."""
    client = redis.Redis.from_url(server.url)
    try:
        return {k.decode(): int(client.hget(k, "refs")) for k in client.keys(f"{prefix}:req:*")}
    finally:
        client.close()


def stored_bytes(client, prefix: str = DEFAULT_PREFIX) -> int:
    """What the queue's keys take in Redis (client buffers left out: the queue's connection keeps a 1 MB
    query buffer for a while after a 1 MB argument)."""
    return sum(client.memory_usage(key, samples=0) for key in client.keys(f"{prefix}:*"))


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


def test_spooled_records_of_one_request_land_once_with_their_payload(redis_server, tmp_path):
    q = make_queue(redis_server, tmp_path)
    redis_server.stop()
    originals = big_request(5)
    ids = q.put(originals)
    assert all(ids) and q.spool.backlog == 5
    # the same frame spooled twice (as if a replay was cut off before the spool was): dedup, no second reference
    q.spool.append(*q.spool.snapshot()[0][1:])
    redis_server.start()
    wait_for(lambda: q.spool.backlog == 0, what="the spool to drain")
    assert stream_ids(redis_server) == collections.Counter(ids)
    assert request_keys(redis_server) == {f"{DEFAULT_PREFIX}:req:{ids[0]}": 5}
    assert q.replayed == 5 and q.replay_duplicates == 5
    for orig, rec, rid in zip(originals, q.get(ids), ids):
        assert_stored_as_put(rec, orig, rid)
    assert q.stats().bytes == sum(own_bytes(r) for r in originals) + request_bytes(originals[0])
    q.close()


def old_spool_frame(records, ids) -> bytes:
    """A spool frame of the first format: records only, each request inline in its fields."""
    parts = [struct.pack("<I", len(records))]
    for r, rid in zip(records, ids):
        items = [rid.encode(), b"1" if r.flagged else b"0", b""]
        for name, value in [("id", rid), ("time", repr(r.time)), ("model", r.model), ("version", str(r.version)),
                            ("flagged", "1" if r.flagged else "0"), ("request_id", r.request_id),
                            ("metadata", json.dumps(r.metadata)), ("scores", json.dumps(r.scores)),
                            ("decision", json.dumps(r.decision)), ("logits", pack_array(r.logits)),
                            ("features", pack_array(r.features)), ("input", pack_array(r.input))]:
            items += [name.encode(), value if isinstance(value, bytes) else value.encode()]
        parts.append(struct.pack("<I", len(items)))
        parts += [struct.pack("<I", len(item)) + item for item in items]
    payload = b"".join(parts)
    return struct.pack("<4sII", b"OGSP", len(payload), zlib.crc32(payload)) + payload


def test_a_spool_of_the_old_format_still_replays(redis_server, tmp_path):
    originals = [record(0), record(1, flagged=False)]
    (tmp_path / "spool").write_bytes(old_spool_frame(originals, ["old0", "old1"]))
    q = make_queue(redis_server, tmp_path)  # replays at start-up
    wait_for(lambda: q.spool.backlog == 0, what="the start-up replay")
    for orig, rec, rid in zip(originals, q.get(["old0", "old1"]), ["old0", "old1"]):
        assert_stored_as_put(rec, orig, rid)
    assert request_keys(redis_server) == {}  # their requests stay inline in the stream entries
    assert q.stats().bytes == sum(own_bytes(r) + request_bytes(r) for r in originals)
    q.close()


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


def timed_local_state(q):
    start = time.monotonic()
    state = q.local_state()
    return state, time.monotonic() - start


def test_local_state_during_an_outage(redis_server, tmp_path):
    q = make_queue(redis_server, tmp_path)
    q.put([record(0)])
    assert q.local_state() == LocalQueueState(spool_backlog=0, reachable=True)
    redis_server.stop()
    q.put([record(1), record(2)])
    state, took = timed_local_state(q)
    assert state == LocalQueueState(spool_backlog=2, reachable=False) and took < 0.1
    redis_server.start()
    wait_for(lambda: q.local_state() == LocalQueueState(spool_backlog=0, reachable=True), what="the replay")
    q.close()


def test_local_state_answers_while_redis_hangs(redis_server, tmp_path):
    client = redis.Redis.from_url(redis_server.url, socket_timeout=1.0, retry=Retry(NoBackoff(), 0), retry_on_error=[])
    q = RedisQueue(client, tmp_path / "spool", connect_retry_s=0.1)
    first = q.put([record(0)])
    redis_server.process.send_signal(signal.SIGSTOP)  # Redis accepts connections but answers nothing
    try:
        done = []
        writer = threading.Thread(target=lambda: done.append(q.put([record(1)])))
        writer.start()
        time.sleep(0.3)  # the put waits on Redis
        assert not done
        state, took = timed_local_state(q)
        assert took < 0.1 and state.spool_backlog == 0
        writer.join(10)  # the put times out and spools
        assert done and all(done[0])
        state, took = timed_local_state(q)
        assert state == LocalQueueState(spool_backlog=1, reachable=False) and took < 0.1
    finally:
        redis_server.process.send_signal(signal.SIGCONT)
    wait_for(lambda: q.local_state() == LocalQueueState(spool_backlog=0, reachable=True), what="the replay")
    # exactly once, though the stopped Redis may have run the timed-out put after all when it resumed
    assert stream_ids(redis_server) == collections.Counter(first + done[0])
    q.close()


def test_puts_skip_a_paused_redis_until_it_answers_again(redis_server, tmp_path):
    """Decided by what reached Redis, not by how long a put took (a loaded machine slows every call): while Redis is
    paused, only the first put tries it (and waits out its own short timeout); the others go to the spool."""
    q = make_queue(redis_server, tmp_path)  # puts wait at most 0.5 s (the default), other calls 5 s
    first = q.put([record(0)])
    tried = []  # puts that went to Redis (the replay thread's calls use the other client)
    run_put = q._run_put

    def counting(*args, client=None, **kwargs):
        if client is q._put_redis:
            tried.append(1)
        return run_put(*args, client=client, **kwargs)

    q._run_put = counting
    redis_server.process.send_signal(signal.SIGSTOP)  # Redis accepts connections but answers nothing
    spooled = []
    try:
        for n in range(1, 11):
            spooled += q.put([record(n), record(n + 100, flagged=False)])
            time.sleep(0.15)  # longer than connect_retry_s (0.1): a put that tried Redis again after it would count
        assert len(tried) == 1, tried  # the first put found Redis unreachable; the other nine spooled at once
        assert all(spooled) and q.spool.backlog == len(spooled)
        assert q.local_state() == LocalQueueState(spool_backlog=len(spooled), reachable=False)
    finally:
        redis_server.process.send_signal(signal.SIGCONT)
    wait_for(lambda: q.local_state() == LocalQueueState(spool_backlog=0, reachable=True), what="the replay")
    # exactly once, though the stopped Redis ran the timed-out put when it resumed
    assert stream_ids(redis_server) == collections.Counter(first + spooled)
    # puts use Redis again
    more = q.put([record(999)])
    assert q.spool.backlog == 0 and stream_ids(redis_server)[more[0]] == 1
    # with nothing to replay, the probe is a PING
    q._reachable, q._down = False, True
    q._wake.set()
    wait_for(lambda: q.local_state().reachable and not q._down, what="the probe")
    assert q.put([record(1000)])[0] in stream_ids(redis_server) and q.spool.backlog == 0
    q.close()


def test_a_put_timeout_of_its_own_leaves_other_calls_theirs(redis_server, tmp_path):
    q = open_queue(redis_server.url + "?socket_timeout=4&put_timeout_s=0.25", spool_path=tmp_path / "spool",
                   idempotency_window_s=30)
    try:
        puts = q._put_redis.connection_pool.connection_kwargs
        others = q.redis.connection_pool.connection_kwargs
        assert (puts["socket_timeout"], puts["socket_connect_timeout"], others["socket_timeout"]) == (0.25, 0.25, 4.0)
        assert q.put([record(0)])[0] in stream_ids(redis_server) and q.idempotency_window_s == 30
    finally:
        q.close()
    q = open_queue(f"sqlite:///{tmp_path / 'q.sqlite'}", idempotency_window_s=30)
    assert q.idempotency_window_s == 30
    q.close()
    with pytest.raises(ValueError, match="put_timeout_s"):
        open_queue(redis_server.url + "?put_timeout_s=soon", spool_path=tmp_path / "spool")


def test_a_retried_request_is_stored_once(redis_server, tmp_path):
    q = make_queue(redis_server, tmp_path, idempotency_window_s=600)
    check_retried_requests_are_stored_once(q)
    client = redis.Redis.from_url(redis_server.url)
    key = f"{DEFAULT_PREFIX}:rid:digits:r2"
    assert set(client.hkeys(key)) == {b"0", b"2", b"5"} and 0 < client.pttl(key) <= 600_000
    client.close()
    q.close()


def test_a_retry_after_the_window_is_stored_again(redis_server, tmp_path):
    made = []

    def make(window_s):
        made.append(make_queue(redis_server, tmp_path, spool=f"spool{len(made)}", key_prefix=f"q{len(made)}",
                               idempotency_window_s=window_s))
        return made[-1]

    check_the_retry_window(make)
    client = redis.Redis.from_url(redis_server.url)
    keys = set(client.keys("q*:rid:*"))  # q1's key (0.5 s window) may have expired by now
    assert b"q0:rid:digits:r1" in keys and not any(k.startswith(b"q2:") for k in keys)  # none with the check off
    assert 0 < client.pttl("q0:rid:digits:r1") <= 600_000  # kept for the window
    client.close()


def test_spooled_records_are_replayed_as_they_are(redis_server, tmp_path):
    q = make_queue(redis_server, tmp_path, idempotency_window_s=600)
    first = q.put(retried("r1"))
    redis_server.stop()
    spooled = q.put(retried("r1"))  # Redis cannot tell a retry now: spooled with ids of its own
    assert all(spooled) and set(spooled).isdisjoint(first)
    redis_server.start()
    wait_for(lambda: q.spool.backlog == 0, what="the spool to drain")
    assert stream_ids(redis_server) == collections.Counter(first + spooled)
    assert q.put(retried("r1")) == first  # the replayed copy answers for no retry
    q.close()


def info_ids(server, prefix: str = DEFAULT_PREFIX) -> set[str]:
    """The record ids of ``P:info`` (model, version and time of each record)."""
    client = redis.Redis.from_url(server.url)
    try:
        return {k.decode() for k in client.hkeys(f"{prefix}:info")}
    finally:
        client.close()


def test_select_filters_by_model_version_flag_and_time(redis_server, tmp_path):
    q = make_queue(redis_server, tmp_path)
    check_select_filters(q)
    q.close()


def test_summary_counts_groups(redis_server, tmp_path):
    q = make_queue(redis_server, tmp_path)
    check_summary(q)
    q.close()


def test_delete_any_state_keeps_bytes_and_request_payloads_right(redis_server, tmp_path):
    q = make_queue(redis_server, tmp_path)
    check_delete(q, lambda: len(request_keys(redis_server)))
    client = redis.Redis.from_url(redis_server.url)
    assert client.xlen(f"{DEFAULT_PREFIX}:stream") == 0 and int(client.get(f"{DEFAULT_PREFIX}:bytes")) == 0
    assert not client.exists(f"{DEFAULT_PREFIX}:info") and client.hlen(f"{DEFAULT_PREFIX}:rec") == 0
    client.close()
    q.close()


def test_filtered_select_decodes_only_the_records_it_returns(redis_server, tmp_path, monkeypatch):
    q = make_queue(redis_server, tmp_path, inline_max_bytes=2000)  # inputs in blobs: those are read only if needed
    ids = q.put(varied() * 3)
    decoded = []
    original = redis_entries.decode_entry

    def counting(fields, state, blob, request):
        decoded.append(fields[b"id"].decode())
        return original(fields, state, blob, request)

    monkeypatch.setattr(redis_entries, "decode_entry", counting)
    assert [r.id for r in q.select(model="cifar", version=3)] == [ids[5], ids[12], ids[19]]
    assert decoded == [ids[5], ids[12], ids[19]]
    decoded.clear()
    assert [r.id for r in q.select(model="digits", limit=2)] == ids[:2] and decoded == ids[:2]
    decoded.clear()
    assert [r.count for r in q.summary()] == [3, 3, 3, 3, 9] and decoded == []
    q.close()


def test_info_goes_with_its_record(redis_server, tmp_path):
    q = make_queue(redis_server, tmp_path, max_size=3, full_policy="evict-oldest")
    ids = q.put([record(i) for i in range(3)])
    assert info_ids(redis_server) == set(ids)
    more = q.put([record(3)])  # evicts ids[0]
    assert info_ids(redis_server) == set(ids[1:] + more)
    q.mark_sent(ids[1:2])
    q.purge_sent()
    assert info_ids(redis_server) == {ids[2], more[0]}
    q.delete(more)
    assert info_ids(redis_server) == {ids[2]}
    q.close()


def test_spooled_records_land_with_their_info(redis_server, tmp_path):
    (tmp_path / "spool").write_bytes(old_spool_frame([record(0)], ["old0"]))  # a frame of the first format too
    q = make_queue(redis_server, tmp_path)
    wait_for(lambda: q.spool.backlog == 0, what="the start-up replay")
    redis_server.stop()
    ids = q.put([dataclasses.replace(record(1), model="cifar"), record(2)])
    assert q.spool.backlog == 2
    redis_server.start()
    wait_for(lambda: q.spool.backlog == 0, what="the spool to drain")
    assert info_ids(redis_server) == {"old0", *ids}
    assert [r.id for r in q.select(model="cifar")] == ids[:1]
    assert [(r.model, r.version, r.count) for r in q.summary()] == [("cifar", 2, 1), ("digits", 1, 2)]
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


def test_each_worker_spools_to_its_own_file_and_worker_0_adopts_those_of_gone_workers(redis_server, tmp_path):
    from oodguard.queues.spool import worker_spool_path

    assert worker_spool_path(tmp_path / "spool", 0) == tmp_path / "spool"
    assert worker_spool_path(tmp_path / "spool", 3) == tmp_path / "spool.w3"
    redis_server.stop()
    spooled = []
    for worker in range(3):  # three workers spool while Redis is down, then all stop
        q = open_queue(redis_server.url, spool_path=tmp_path / "spool", worker=worker, workers=3)
        assert q.spool.path == worker_spool_path(tmp_path / "spool", worker)
        spooled += q.put([record(10 * worker + j) for j in range(4)])
        q._stop.set()  # no replay at close: Redis is down anyway
        q.close()
    with open(tmp_path / "spool.w2", "ab") as f:  # a torn tail in an orphan: never acknowledged, dropped
        f.write(b"OGSP\xff\x00\x00\x00\x01")
    (tmp_path / "spool.wx").write_bytes(b"not a worker spool")  # not ours: left alone
    redis_server.start()
    # restarted with two workers: worker 0 takes over spool.w2 (index 2 no longer runs), worker 1 keeps its own
    q0 = open_queue(redis_server.url, spool_path=tmp_path / "spool", worker=0, workers=2)
    q1 = open_queue(redis_server.url, spool_path=tmp_path / "spool", worker=1, workers=2)
    try:
        assert not (tmp_path / "spool.w2").exists() and (tmp_path / "spool.wx").exists()
        wait_for(lambda: q0.spool.backlog == 0 and q1.spool.backlog == 0, what="both spools to drain")
        counts = stream_ids(redis_server)
        assert sorted(counts) == sorted(spooled) and set(counts.values()) == {1}
    finally:
        q0.close()
        q1.close()


def test_absorbing_a_spool_twice_lands_its_records_once(redis_server, tmp_path):
    from oodguard.queues.spool import Spool

    redis_server.stop()
    q = make_queue(redis_server, tmp_path, spool="spool.w1")
    ids = q.put([record(i) for i in range(3)])
    q._stop.set()
    q.close()
    copy = tmp_path / "copy"
    copy.write_bytes((tmp_path / "spool.w1").read_bytes())
    spool = Spool(tmp_path / "spool")
    assert spool.absorb(tmp_path / "spool.w1") == 3 and spool.absorb(copy) == 3  # a crash before the delete
    assert spool.backlog == 6
    spool.close()
    redis_server.start()
    q = make_queue(redis_server, tmp_path)
    try:
        wait_for(lambda: q.spool.backlog == 0, what="the replay")
        assert stream_ids(redis_server) == collections.Counter(ids)
        assert q.replay_duplicates == 3
    finally:
        q.close()


def test_prepare_then_put_prepared_stores_as_put(redis_server, tmp_path):
    q = make_queue(redis_server, tmp_path)
    try:
        prepared = q.prepare([record(1), record(2, flagged=False)])
        ids = q.put_prepared(prepared)
        assert ids == prepared[0] and [r.id for r in q.get(ids)] == ids
        assert q.put_prepared(q.prepare([])) == []
    finally:
        q.close()
