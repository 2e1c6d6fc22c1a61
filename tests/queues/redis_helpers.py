"""What the Redis Streams queue tests share: a queue on the test's redis-server, what the queue's keys hold,
records written as the previous version wrote them, and waiting for a replay."""

from __future__ import annotations

import collections
import json
import struct
import time
import zlib

import redis

from oodguard.queues.codec import pack_array
from oodguard.queues.redis_streams import DEFAULT_PREFIX, RedisQueue


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


def info_ids(server, prefix: str = DEFAULT_PREFIX) -> set[str]:
    """The record ids of ``P:info`` (model, version and time of each record)."""
    client = redis.Redis.from_url(server.url)
    try:
        return {k.decode() for k in client.hkeys(f"{prefix}:info")}
    finally:
        client.close()


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
