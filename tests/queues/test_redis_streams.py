"""The Redis Streams queue against a real redis-server, Redis answering: records read back as put, claims
(never one record twice, across processes), selections, summaries, deletes, what ``P:info`` holds, the queue
URLs and settings."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import redis

from oodguard.queues import redis_entries
from oodguard.queues.base import PENDING, SENT, QueueError
from oodguard.queues.factory import open_queue, split_redis_url
from oodguard.queues.redis_streams import DEFAULT_PREFIX, RedisQueue
from oodguard.queues.sqlite import SQLiteQueue
from oodguard.serve.settings import Settings, SettingsError

from .redis_helpers import info_ids, make_queue, request_keys, stream_ids
from .store_checks import assert_stored_as_put, check_delete, check_select_filters, check_summary, record, varied


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


def test_prepare_then_put_prepared_stores_as_put(redis_server, tmp_path):
    q = make_queue(redis_server, tmp_path)
    try:
        prepared = q.prepare([record(1), record(2, flagged=False)])
        ids = q.put_prepared(prepared)
        assert ids == prepared[0] and [r.id for r in q.get(ids)] == ids
        assert q.put_prepared(q.prepare([])) == []
    finally:
        q.close()


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
