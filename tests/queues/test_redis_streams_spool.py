"""The Redis Streams queue's spool: records put while Redis is down land exactly once after the replay, across a
process restart, a torn tail, frames of the first format, duplicated frames and the spools of gone workers."""

from __future__ import annotations

import collections
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from oodguard.queues.base import QueueError
from oodguard.queues.factory import open_queue
from oodguard.queues.redis_entries import encode_records
from oodguard.queues.redis_streams import DEFAULT_PREFIX

from .redis_helpers import info_ids, make_queue, old_spool_frame, request_keys, stream_ids, wait_for
from .store_checks import assert_stored_as_put, big_request, own_bytes, record, request_bytes, retried


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
from store_checks import record
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
