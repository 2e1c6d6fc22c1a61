"""Records <-> the Redis store's stream entries (layout: :mod:`oodguard.queues.redis_scripts`).

Writing: a put's records become the put script's items (``id, flag, blob, field, value, ...``; the spool keeps
the same items, :mod:`oodguard.queues.spool`), their request payloads (one per request, keyed by the id of its
first record) and the idempotency arguments (each retry candidate's item positions and input digests).
Reading: stream entries, blobs and request payloads back into :class:`QueueRecord`, and the model / version /
time of records from ``P:info`` for the filters of ``select`` and ``summary``.
"""

from __future__ import annotations

import hashlib
import json
from typing import Sequence

import redis

from .base import NewRecord, QueueRecord, decisions_json, request_runs
from .codec import group_requests, pack_array, unpack_array
from .spool import SpoolRecord, SpoolRequest

#: (record id, seq, state): which record to read, and the state it is reported in
Row = tuple[str, int, str]


def _b(value) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


# -- writing ------------------------------------------------------------------------------------------
def encode_records(records: Sequence[NewRecord], ids: Sequence[str], now: float,
                   inline_max_bytes: int) -> tuple[list[SpoolRecord], list[SpoolRequest]]:
    """The script's (and the spool's) items for ``records`` stored as ``ids``, and their request payloads,
    one per request, keyed by the id of its first record."""
    requests, refs = group_requests(records)
    keys: dict[int, str] = {}
    for rid, ref in zip(ids, refs):
        if ref is not None:
            keys.setdefault(ref, rid)
    items = [encode_record(r, rid, now, keys.get(ref), decision, inline_max_bytes)
             for r, rid, ref, decision in zip(records, ids, refs, decisions_json([r.decision for r in records]))]
    payloads = [[keys[j].encode(), request_id.encode(), metadata.encode()]
                for j, (request_id, metadata) in enumerate(requests)]
    return items, payloads


def encode_record(r: NewRecord, rid: str, now: float, request_key: str | None, decision: str,
                  inline_max_bytes: int) -> SpoolRecord:
    """One record's item: its id, flag, blob (``b""``: input inline), then field, value, ...; an input whose
    packed bytes exceed ``inline_max_bytes`` goes to the blob."""
    flag = b"1" if r.flagged else b"0"
    packed = pack_array(r.input)
    blob = b""
    fields = {
        "id": rid, "time": repr(now if r.time is None else float(r.time)), "model": r.model,
        "version": str(int(r.version)), "flagged": flag,
        "scores": json.dumps({k: float(v) for k, v in r.scores.items()}), "decision": decision,
        "logits": pack_array(r.logits), "features": pack_array(r.features),
    }
    if request_key is not None:
        fields["req"] = request_key
    if len(packed) > inline_max_bytes:
        blob, fields["input_ref"] = packed, b"1"
    else:
        fields["input"] = packed
    items = [rid.encode(), flag, blob]
    for name, value in fields.items():
        items += [name.encode(), _b(value)]
    return items


def input_digest(item: SpoolRecord) -> bytes:
    """BLAKE2b-128 (hex) of the packed input of a script item: what tells a retry from a reused request id."""
    packed = item[2] or dict(zip(item[3::2], item[4::2]))[b"input"]  # its blob, else the inline field
    return hashlib.blake2b(packed, digest_size=16).hexdigest().encode()


def idempotency_args(records: Sequence[NewRecord], items: Sequence[SpoolRecord], window_s: float) -> list:
    """The put script's idempotency arguments for ``records`` (encoded as ``items``): the window in
    milliseconds, then the runs that may be retries (:func:`request_runs`) with each record's item position
    and input digest; no runs with the check off (``window_s`` 0)."""
    if not window_s:
        return [0, 0]
    runs = request_runs(records)
    argv: list = [max(1, round(window_s * 1000)), len(runs)]
    for run in runs:
        argv += [run.start + 1, run.stop - run.start, run.model, run.request_id]
        for item, encoded in zip(run.items, items[run.start:run.stop]):
            argv += [b"" if item is None else str(item), input_digest(encoded)]
    return argv


# -- reading ------------------------------------------------------------------------------------------
def decode_entry(fields: dict, state: str, blob: bytes | None, request: tuple[str, dict] | None) -> QueueRecord:
    """The record of a stream entry's ``fields``, with its blob (if its input is not inline) and request."""
    f = {k.decode(): v for k, v in fields.items()}
    packed = blob if f.get("input_ref") == b"1" else f["input"]
    if request is None:  # inline in entries of an older version; neither for a record without request
        request = (f.get("request_id", b"").decode(), json.loads(f.get("metadata", b"{}")))
    request_id, metadata = request[0], dict(request[1])  # a copy per record: readers may change theirs
    return QueueRecord(
        model=f["model"].decode(), version=int(f["version"]), input=unpack_array(packed),
        logits=unpack_array(f["logits"]), features=unpack_array(f["features"]), scores=json.loads(f["scores"]),
        decision=json.loads(f["decision"]), flagged=f["flagged"] == b"1", request_id=request_id,
        metadata=metadata, time=float(f["time"]), id=f["id"].decode(), seq=int(f["seq"]), state=state,
    )


def fetch_records(client: redis.Redis, prefix: str, rows: Sequence[Row]) -> list[QueueRecord]:
    """Records for (id, seq, state) rows, in that order; ones deleted meanwhile are left out. Two round trips:
    the entries, then their blobs and request payloads."""
    if not rows:
        return []
    stream = f"{prefix}:stream"
    pipe = client.pipeline(transaction=False)
    for _, seq, _ in rows:
        pipe.xrange(stream, f"{seq}-0", f"{seq}-0", count=1)
    entries = [e[0][1] if e else None for e in pipe.execute()]
    refs = [rid for (rid, _, _), e in zip(rows, entries) if e and e.get(b"input_ref") == b"1"]
    keys = sorted({e[b"req"] for e in entries if e and b"req" in e})
    pipe = client.pipeline(transaction=False)
    if refs:
        pipe.mget([f"{prefix}:blob:{rid}" for rid in refs])
    for key in keys:
        pipe.hmget(f"{prefix}:req:{key.decode()}", ["request_id", "metadata"])
    answers = pipe.execute()
    blobs = dict(zip(refs, answers.pop(0))) if refs else {}
    requests = {key: (rid.decode(), json.loads(meta)) for key, (rid, meta) in zip(keys, answers) if rid is not None}
    out = []
    for (rid, _, state), e in zip(rows, entries):
        if not e or (rid in blobs and blobs[rid] is None) or (b"req" in e and e[b"req"] not in requests):
            continue
        out.append(decode_entry(e, state, blobs.get(rid), requests.get(e.get(b"req"))))
    return out


def read_info(client: redis.Redis, prefix: str, rows: Sequence[Row]) -> list[tuple[float, int, str] | None]:
    """(time, version, model) of (id, seq, state) rows from ``P:info``; the stream entry of a record stored by
    an older version (no ``P:info``); None for a record deleted meanwhile."""
    if not rows:
        return []
    values = client.hmget(f"{prefix}:info", [rid for rid, _, _ in rows])
    out: list[tuple[float, int, str] | None] = []
    for value in values:
        if value is None:
            out.append(None)
        else:
            t, v, m = value.decode().split(":", 2)
            out.append((float(t), int(v), m))
    old = [j for j, value in enumerate(values) if value is None]
    if old:  # entries of an older version (or deleted records): the stream entry holds the fields
        pipe = client.pipeline(transaction=False)
        for j in old:
            seq = rows[j][1]
            pipe.xrange(f"{prefix}:stream", f"{seq}-0", f"{seq}-0", count=1)
        for j, entry in zip(old, pipe.execute()):
            if entry:
                f = entry[0][1]
                out[j] = (float(f[b"time"]), int(f[b"version"]), f[b"model"].decode())
    return out


__all__ = ["Row", "encode_records", "encode_record", "input_digest", "idempotency_args", "decode_entry",
           "fetch_records", "read_info"]
