"""The query queue on Redis Streams, with a local spool so that no acknowledged record is lost while Redis
is unreachable.

Keys (``P`` = ``key_prefix``, default ``oodguard:queue``; standalone Redis, not Redis Cluster):

=====================  ==================================================================================
``P:stream``           the stream: one entry per record, entry id ``<seq>-0``. Fields: ``id``, ``seq``,
                       ``time``, ``model``, ``version``, ``flagged``, ``req`` (its request key, absent for a
                       record without request id and metadata), ``scores`` / ``decision`` (JSON),
                       ``logits`` / ``features`` / ``input`` (packed as in the SQLite queue). An input whose
                       packed bytes exceed ``inline_max_bytes`` is stored in ``P:blob:<id>`` instead (field
                       ``input_ref`` = ``1``); the blob is deleted with the record. Entries written by an
                       older version carry ``request_id`` and ``metadata`` (JSON) inline instead of ``req``.
``P:req:<key>``        hash ``request_id``, ``metadata`` (JSON), ``refs``: one request's id and metadata, stored
                       once for all its records (key = the id of its first record); ``refs`` counts the
                       records that reference it, and the last one deleted (evicted, purged) deletes it
``P:rec``              hash: record id -> ``"<seq>:<flag 1|0>:<state>:<bytes>:<request key>"`` (the mutable
                       state; stream entries are never rewritten). Records of an older version have
                       ``"<seq>:<flag>:<state>"`` and count 0 bytes.
``P:z:<state>:<flag>`` sorted sets of record ids scored by ``seq``, one per state (pending / claimed / sent)
                       and flag (1 = flagged, 0 = sampled): oldest-first order for select / claim
``P:info``             hash: record id -> ``"<time>:<version>:<model>"`` (immutable, written with the entry,
                       deleted with the record): what the model / version / time filters of ``select`` and
                       ``summary`` read instead of the stream entries (which carry the arrays). Records stored
                       by an older version have none; their stream entry is read instead (and an older
                       version deleting a record leaves its entry here: harmless, reads start from ``P:rec``
                       or the sorted sets)
``P:seen``             set of every record id ever stored (dedup; never shrinks, ~50-80 bytes per id)
``P:rid:<m>:<r>``      hash: item position -> ``"<record id>:<input digest>"`` of the records stored for model
                       ``<m>`` under request id ``<r>`` (the latest per item; the digest is BLAKE2b-128 of
                       the packed input, hex): what a retry of that request is matched against
                       (idempotency, below). Expires ``idempotency_window_s`` after the last put that stored
                       records for it; written only with the idempotency check on
``P:seq``              insertion counter
``P:bytes``            the bytes of the unharvested (pending + claimed) records: what ``max_bytes`` bounds
``P:counters``         hash: accepted, rejected, evicted
=====================  ==================================================================================

Bytes of a record (as in the SQLite queue): its packed arrays (blob included) + scores and decision JSON; the
first record that stores a request payload also carries the payload's bytes (request id + metadata JSON), so
a request counts once. The put script computes them from the fields, so a spooled record needs no extra item.

Atomicity: every write is one Lua script (Redis runs each one atomically): ``put`` checks ``P:seen``,
applies both bounds / the full policy, and adds the entry, its state, its id and its reference to the request
payload in one step, so "check id + add" cannot race and a record id lands (and references its request) at
most once; ``put`` also looks up and records ``P:rid:<m>:<r>`` in that step, so a retried request
(:mod:`oodguard.queues.base`: every record of it finds a record of the same item position and input digest
that still exists) stores nothing and returns the earlier ids, whichever gateway process wrote them; ``claim``
pops the oldest pending ids and marks them claimed in one step, so two concurrent harvests never get the same
record; ``delete`` removes records (any state) with their blob, info and request reference in one step.
``P:bytes`` and the ``refs`` of ``P:req:<key>`` change in the same scripts as the records they count.

Durability: a ``put`` returns once Redis has answered the script; run Redis with ``appendonly yes`` and
``appendfsync always`` for that to mean "on disk" (the queue does not configure the server).

Spool: when Redis is unreachable (connection refused / reset, timeout, loading, read-only, OOM), ``put``
assigns the ids as usual, appends the records to ``spool_path`` (one ``fsync``ed frame per ``put``; the file,
one per process, and the workers' files are :mod:`oodguard.queues.spool`'s) and returns the ids. A background
thread replays the spool into Redis when it answers again (and once at start-up: crash recovery), through the
same script with dedup by id, and cuts the replayed frames off the spool only after Redis accepted them; a
crash in between replays them again, which dedup makes harmless (a duplicate adds no request reference).
Replayed records are always admitted: under ``evict-oldest`` older pending records are evicted for them as
usual, under ``reject`` the queue may exceed ``max_size`` / ``max_bytes`` by at most the spool backlog (those
records were already acknowledged). Replayed records are never taken for a retry, nor recorded for one (their
ids were acknowledged already; a request spooled and then retried into Redis is stored twice).

Once a put finds Redis unreachable, puts go to the spool without trying Redis until the replay thread finds it
back: every ``connect_retry_s`` it replays the spool, or PINGs Redis when the spool is empty, and the first that
works lets puts use Redis again. A put waits for Redis at most ``put_timeout_s`` (to connect, and for each
answer: a client of its own; other calls keep the client's 5 s or the URL's ``socket_timeout``), so a Redis that
accepts connections but answers nothing (paused, overloaded) costs one put that long, not every put; a put that
times out is spooled (its write may still land: replay dedups by id). :meth:`RedisQueue.local_state` reports the
store unreachable from a failed call until a call works again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from pathlib import Path
from typing import Sequence
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis
import redis.exceptions as rx
from redis.backoff import NoBackoff
from redis.retry import Retry

from .base import (CLAIMED, DEFAULT_MAX_BYTES, PENDING, SENT, STATES, DropLog, LocalQueueState, NewRecord, QueryQueue,
                   QueueError, QueueRecord, QueueStats, SummaryRow, check_bounds, decisions_json, new_record_ids,
                   request_runs)
from .codec import group_requests, pack_array, unpack_array
from .spool import Spool, SpoolRecord, SpoolRequest, adopt_orphan_spools, worker_spool_path

log = logging.getLogger("oodguard.queues.redis_streams")

#: errors that mean "Redis cannot take the write now": the records go to the spool
UNREACHABLE = (rx.ConnectionError, rx.TimeoutError, rx.ReadOnlyError, rx.MasterDownError, rx.OutOfMemoryError,
               ConnectionError, TimeoutError)

DEFAULT_PREFIX = "oodguard:queue"
DEFAULT_INLINE_MAX_BYTES = 256 * 1024
#: the longest a put waits for Redis (to connect, for an answer) before it spools its records
DEFAULT_PUT_TIMEOUT_S = 0.5

# Shared by the scripts below. P:rec values are '<seq>:<flag>:<state>:<bytes>:<request key>' (request key ''
# for a record without request); records stored by an older version have '<seq>:<flag>:<state>' and count 0 bytes.
RECORD_LUA = r"""
local function parse(v)
  local seq, f, state, tail = string.match(v, '^(%d+):(%d):(%a+)(.*)$')
  local nbytes, req = string.match(tail, '^:(%d+):(.*)$')
  return seq, f, state, tail, tonumber(nbytes or '0'), req or ''
end
-- drop one reference to a request payload; the last one deletes it
local function unref(P, req)
  if req ~= '' and redis.call('HINCRBY', P .. ':req:' .. req, 'refs', -1) <= 0 then
    redis.call('DEL', P .. ':req:' .. req)
  end
end
-- delete a record everywhere; returns its bytes
local function delete(P, id)
  local seq, f, state, _, nbytes, req = parse(redis.call('HGET', P .. ':rec', id))
  redis.call('ZREM', P .. ':z:' .. state .. ':' .. f, id)
  redis.call('HDEL', P .. ':rec', id)
  redis.call('HDEL', P .. ':info', id)
  redis.call('XDEL', P .. ':stream', seq .. '-0')
  redis.call('DEL', P .. ':blob:' .. id)
  unref(P, req)
  return nbytes
end
"""

# ARGV: max_size, max_bytes, policy, admit (1: ignore the bounds: replayed records), m, then per request payload:
#   key, request_id, metadata; then the idempotency window (ms), r, then per run (a request that may be a retry):
#   its first record (1-based), count, model, request_id, then per record: item ('' = none), input digest; then n,
#   then per record: id, flag, blob ('' = input inline), nfields, field, value, ... (field 'req' names the
#   record's request key)
# Returns per record 1 stored, 2 already stored (dedup), 0 refused (queue full) or, for a retried request, the id
# of the earlier record; then the ids it evicted.
PUT_LUA = RECORD_LUA + r"""
local P = KEYS[1]
local max_size, max_bytes, policy, admit = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], ARGV[4] == '1'
local rec, seen = P .. ':rec', P .. ':seen'
local payloads, i = {}, 6
for _ = 1, tonumber(ARGV[5]) do
  payloads[ARGV[i]] = {ARGV[i + 1], ARGV[i + 2]}
  i = i + 3
end
local window, nruns, runs = ARGV[i], tonumber(ARGV[i + 1]), {}
i = i + 2
for _ = 1, nruns do
  local run = {start = tonumber(ARGV[i]), key = P .. ':rid:' .. ARGV[i + 2] .. ':' .. ARGV[i + 3], items = {},
               digests = {}}
  run.stop = run.start + tonumber(ARGV[i + 1]) - 1
  i = i + 4
  for j = 1, run.stop - run.start + 1 do
    run.items[j], run.digests[j] = ARGV[i], ARGV[i + 1]
    i = i + 2
  end
  runs[run.start] = run
end
-- the ids of the records an earlier copy of the run stored (same item positions and inputs, still there), or nil
local function earlier(run)
  local ids = {}
  for j, item in ipairs(run.items) do
    local v = item ~= '' and redis.call('HGET', run.key, item)
    if not v then return nil end
    local id, digest = string.match(v, '^(.-):(.*)$')
    if digest ~= run.digests[j] or redis.call('HEXISTS', rec, id) == 0 then return nil end
    ids[j] = id
  end
  return ids
end
local n = tonumber(ARGV[i])
i = i + 1
-- what a record's bytes are: arrays, scores, decision (and the inline request of an older spool frame)
local counted = {input = true, logits = true, features = true, scores = true, decision = true,
                 request_id = true, metadata = true}
local first = tonumber(redis.call('GET', P .. ':seq') or '0') + 1
local cur = redis.call('ZCARD', P .. ':z:pending:1') + redis.call('ZCARD', P .. ':z:pending:0')
          + redis.call('ZCARD', P .. ':z:claimed:1') + redis.call('ZCARD', P .. ':z:claimed:0')
local used = tonumber(redis.call('GET', P .. ':bytes') or '0')
local start_used = used
local out, evicted, accepted, rejected = {}, {}, 0, 0
local run, repeated = nil, {}  -- the run record k belongs to; record index -> the id of its earlier copy
for k = 1, n do
  if runs[k] then
    run = runs[k]
    for j, id in ipairs(earlier(run) or {}) do repeated[run.start + j - 1] = id end
  elseif run and k > run.stop then
    run = nil
  end
  local id, flag, blob, nf = ARGV[i], ARGV[i + 1], ARGV[i + 2], tonumber(ARGV[i + 3])
  local fields, req, nbytes, info = {}, '', #blob, {}
  for j = 1, nf, 2 do
    local name, value = ARGV[i + 3 + j], ARGV[i + 4 + j]
    fields[j], fields[j + 1] = name, value
    if name == 'req' then req = value elseif counted[name] then nbytes = nbytes + #value end
    if name == 'time' or name == 'version' or name == 'model' then info[name] = value end
  end
  i = i + 4 + nf
  if repeated[k] then
    out[k] = repeated[k]
  elseif redis.call('SISMEMBER', seen, id) == 1 then
    out[k] = 2
  else
    local rkey = P .. ':req:' .. req
    if req ~= '' and redis.call('EXISTS', rkey) == 0 then  -- the first record stored carries its request
      nbytes = nbytes + #payloads[req][1] + #payloads[req][2]
    end
    while policy == 'evict-oldest' and nbytes <= max_bytes and (cur >= max_size or used + nbytes > max_bytes) do
      -- the oldest pending record stored before this call (never one of this call's records)
      local victim, vseq = nil, nil
      for _, f in ipairs({'1', '0'}) do
        local r = redis.call('ZRANGEBYSCORE', P .. ':z:pending:' .. f, '-inf', '(' .. first, 'WITHSCORES', 'LIMIT', 0, 1)
        if r[1] and (vseq == nil or tonumber(r[2]) < vseq) then victim, vseq = r[1], tonumber(r[2]) end
      end
      if not victim then break end
      used = used - delete(P, victim)
      cur = cur - 1
      evicted[#evicted + 1] = victim
    end
    if (cur >= max_size or used + nbytes > max_bytes) and not admit then
      out[k] = 0
      rejected = rejected + 1
    else
      if req ~= '' then
        -- (re)stored if missing: a replayed chunk may just have evicted the last record of its request
        if redis.call('EXISTS', rkey) == 0 then
          redis.call('HSET', rkey, 'request_id', payloads[req][1], 'metadata', payloads[req][2])
        end
        redis.call('HINCRBY', rkey, 'refs', 1)
      end
      local seq = redis.call('INCR', P .. ':seq')
      if blob ~= '' then redis.call('SET', P .. ':blob:' .. id, blob) end
      redis.call('XADD', P .. ':stream', seq .. '-0', 'seq', tostring(seq), unpack(fields))
      redis.call('HSET', rec, id, string.format('%d:%s:pending:%d:%s', seq, flag, nbytes, req))
      redis.call('ZADD', P .. ':z:pending:' .. flag, seq, id)
      if info.model then
        redis.call('HSET', P .. ':info', id, (info.time or '0') .. ':' .. (info.version or '0') .. ':' .. info.model)
      end
      redis.call('SADD', seen, id)
      if run and run.items[k - run.start + 1] ~= '' then  -- what a later copy of its request finds
        redis.call('HSET', run.key, run.items[k - run.start + 1], id .. ':' .. run.digests[k - run.start + 1])
        redis.call('PEXPIRE', run.key, window)
      end
      cur = cur + 1
      used = used + nbytes
      accepted = accepted + 1
      out[k] = 1
    end
  end
end
if used ~= start_used then redis.call('INCRBY', P .. ':bytes', used - start_used) end
if accepted > 0 then redis.call('HINCRBY', P .. ':counters', 'accepted', accepted) end
if rejected > 0 then redis.call('HINCRBY', P .. ':counters', 'rejected', rejected) end
if #evicted > 0 then redis.call('HINCRBY', P .. ':counters', 'evicted', #evicted) end
for _, id in ipairs(evicted) do out[#out + 1] = id end
return out
"""

# ARGV: limit, which ('1', '0' or '*'). Returns id, seq, flag, id, seq, flag, ... of the claimed records.
CLAIM_LUA = RECORD_LUA + r"""
local P, limit, which = KEYS[1], tonumber(ARGV[1]), ARGV[2]
local flags = {which}
if which == '*' then flags = {'1', '0'} end
local cands = {}
for _, f in ipairs(flags) do
  local r = redis.call('ZRANGE', P .. ':z:pending:' .. f, 0, limit - 1, 'WITHSCORES')
  for j = 1, #r, 2 do cands[#cands + 1] = {r[j], tonumber(r[j + 1]), f} end
end
table.sort(cands, function(a, b) return a[2] < b[2] end)
local out = {}
for j = 1, math.min(limit, #cands) do
  local id, seq, f = cands[j][1], cands[j][2], cands[j][3]
  local _, _, _, tail = parse(redis.call('HGET', P .. ':rec', id))
  redis.call('ZREM', P .. ':z:pending:' .. f, id)
  redis.call('ZADD', P .. ':z:claimed:' .. f, seq, id)
  redis.call('HSET', P .. ':rec', id, string.format('%d:%s:claimed', seq, f) .. tail)
  out[#out + 1] = id
  out[#out + 1] = string.format('%d', seq)
  out[#out + 1] = f
end
return out
"""

# ARGV: to_state, from_states (comma separated), ids... Returns the ids that moved.
MOVE_LUA = RECORD_LUA + r"""
local P, to, from = KEYS[1], ARGV[1], ',' .. ARGV[2] .. ','
local moved, freed = {}, 0
for j = 3, #ARGV do
  local id = ARGV[j]
  local v = redis.call('HGET', P .. ':rec', id)
  if v then
    local seq, f, state, tail, nbytes = parse(v)
    if string.find(from, ',' .. state .. ',', 1, true) then
      redis.call('ZREM', P .. ':z:' .. state .. ':' .. f, id)
      redis.call('ZADD', P .. ':z:' .. to .. ':' .. f, seq, id)
      redis.call('HSET', P .. ':rec', id, seq .. ':' .. f .. ':' .. to .. tail)
      -- sent records leave the unharvested set (pending <-> claimed keeps them counted)
      if to == 'sent' then freed = freed + nbytes end
      moved[#moved + 1] = id
    end
  end
end
if freed > 0 then redis.call('DECRBY', P .. ':bytes', freed) end
return moved
"""

# ARGV: record ids. Deletes them whatever their state; returns how many existed.
DELETE_LUA = RECORD_LUA + r"""
local P, n, freed = KEYS[1], 0, 0
for j = 1, #ARGV do
  local v = redis.call('HGET', P .. ':rec', ARGV[j])
  if v then
    local _, _, state = parse(v)
    local nbytes = delete(P, ARGV[j])
    if state ~= 'sent' then freed = freed + nbytes end  -- sent records no longer count in P:bytes
    n = n + 1
  end
end
if freed > 0 then redis.call('DECRBY', P .. ':bytes', freed) end
return n
"""

# ARGV: most records to delete in this call. Returns how many were deleted.
PURGE_LUA = RECORD_LUA + r"""
local P, limit = KEYS[1], tonumber(ARGV[1])
local n = 0
for _, f in ipairs({'1', '0'}) do
  for _, id in ipairs(redis.call('ZRANGE', P .. ':z:sent:' .. f, 0, limit - n - 1)) do
    delete(P, id)  -- sent records no longer count in P:bytes
    n = n + 1
  end
  if n >= limit then break end
end
return n
"""


#: what :meth:`RedisQueue.prepare` returns
Prepared = tuple[list[str], list[SpoolRecord], list[SpoolRequest], list[str], list]


# -- the queue --------------------------------------------------------------------------------------
def _b(value) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


def redis_client(url: str, timeout_s: float | None = None) -> redis.Redis:
    """A client for ``url`` that fails at once instead of retrying (the queue spools instead). Without
    ``timeout_s``: 2 s to connect and 5 s per answer, unless the URL's query says otherwise (``socket_timeout``,
    ``socket_connect_timeout``); with it, at most ``timeout_s`` for both, whatever the URL says (the puts')."""
    timeouts = {"socket_connect_timeout": 2.0, "socket_timeout": 5.0}
    if timeout_s is not None:
        timeouts = {"socket_connect_timeout": min(2.0, timeout_s), "socket_timeout": timeout_s}
        parts = urlsplit(url)  # redis-py lets the URL's query win over keyword arguments
        query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in timeouts]
        url = urlunsplit(parts._replace(query=urlencode(query)))
    return redis.Redis.from_url(url, retry=Retry(NoBackoff(), 0), retry_on_error=[], **timeouts)


def _input_digest(item: SpoolRecord) -> bytes:
    """BLAKE2b-128 (hex) of the packed input of a script item: what tells a retry from a reused request id."""
    packed = item[2] or dict(zip(item[3::2], item[4::2]))[b"input"]  # its blob, else the inline field
    return hashlib.blake2b(packed, digest_size=16).hexdigest().encode()


class RedisQueue(QueryQueue):
    """:class:`QueryQueue` on one Redis database; see the module docstring for keys, atomicity and the spool."""

    def __init__(self, client: redis.Redis | str, spool_path: str | Path, max_size: int = 100_000,
                 full_policy: str = "reject", key_prefix: str = DEFAULT_PREFIX,
                 inline_max_bytes: int = DEFAULT_INLINE_MAX_BYTES, connect_retry_s: float = 0.5,
                 replay_batch: int = 256, max_bytes: int = DEFAULT_MAX_BYTES,
                 put_timeout_s: float | None = DEFAULT_PUT_TIMEOUT_S, idempotency_window_s: float = 0.0):
        """``client``: a URL (see :func:`redis_client`), or a client whose own timeouts then serve puts too
        (``put_timeout_s`` needs the URL; None: puts keep the URL's client's timeouts)."""
        check_bounds(max_size, max_bytes, full_policy, idempotency_window_s)
        if inline_max_bytes < 0:
            raise ValueError(f"inline_max_bytes must be >= 0, got {inline_max_bytes}")
        if not key_prefix:
            raise ValueError("key_prefix must not be empty")
        if put_timeout_s is not None and not put_timeout_s > 0:
            raise ValueError(f"put_timeout_s must be > 0, got {put_timeout_s}")
        put_client = client
        if isinstance(client, str):
            put_client = redis_client(client, put_timeout_s) if put_timeout_s is not None else None
            client = redis_client(client)
        self.redis = client
        self._put_redis = put_client or client  # the client of puts (their short timeout)
        self.put_timeout_s = put_timeout_s
        self.idempotency_window_s = idempotency_window_s
        self.max_size = max_size
        self.max_bytes = max_bytes
        self.full_policy = full_policy
        self.key_prefix = key_prefix
        self.inline_max_bytes = inline_max_bytes
        self.connect_retry_s = connect_retry_s
        self.replay_batch = replay_batch
        self.spool = Spool(spool_path)
        self._put_script = client.register_script(PUT_LUA)
        self._claim_script = client.register_script(CLAIM_LUA)
        self._move_script = client.register_script(MOVE_LUA)
        self._purge_script = client.register_script(PURGE_LUA)
        self._delete_script = client.register_script(DELETE_LUA)
        self._closed = False
        self._down = False  # puts spool without trying Redis until the replay thread finds it back
        self._reachable = True  # False while the last Redis call failed as unreachable, True after one worked
        self._drops = DropLog(log, key_prefix)
        self._replay_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.replayed = 0  # spooled records that landed in Redis (this process)
        self.replay_duplicates = 0  # spooled records that were already there
        self._thread = threading.Thread(target=self._replay_loop, name="redis-queue-replay", daemon=True)
        self._thread.start()  # replays a spool left by an earlier process right away

    def _key(self, name: str) -> str:
        return f"{self.key_prefix}:{name}"

    def _check_open(self) -> None:
        if self._closed:
            raise QueueError(f"queue {self.key_prefix} is closed")

    def _call(self, fn, *args, **kwargs):
        self._check_open()
        try:
            result = fn(*args, **kwargs)
        except rx.RedisError as exc:
            if isinstance(exc, UNREACHABLE):
                self._reachable = False
            raise QueueError(f"redis queue {self.key_prefix}: {exc}") from exc
        self._reachable = True
        return result

    # -- records <-> stream entries -----------------------------------------------------------------
    def _encode(self, records: Sequence[NewRecord], ids: Sequence[str],
                now: float) -> tuple[list[SpoolRecord], list[SpoolRequest]]:
        """The script's (and the spool's) items for ``records`` stored as ``ids``, and their request payloads,
        one per request, keyed by the id of its first record."""
        requests, refs = group_requests(records)
        keys: dict[int, str] = {}
        for rid, ref in zip(ids, refs):
            if ref is not None:
                keys.setdefault(ref, rid)
        items = [self._encode_record(r, rid, now, keys.get(ref), decision)
                 for r, rid, ref, decision in zip(records, ids, refs, decisions_json([r.decision for r in records]))]
        payloads = [[keys[j].encode(), request_id.encode(), metadata.encode()]
                    for j, (request_id, metadata) in enumerate(requests)]
        return items, payloads

    def _encode_record(self, r: NewRecord, rid: str, now: float, request_key: str | None, decision: str) -> SpoolRecord:
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
        if len(packed) > self.inline_max_bytes:
            blob, fields["input_ref"] = packed, b"1"
        else:
            fields["input"] = packed
        items = [rid.encode(), flag, blob]
        for name, value in fields.items():
            items += [name.encode(), _b(value)]
        return items

    @staticmethod
    def _decode(fields: dict, state: str, blob: bytes | None, request: tuple[str, dict] | None) -> QueueRecord:
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

    def _fetch(self, rows: Sequence[tuple[str, int, str]]) -> list[QueueRecord]:
        """Records for (id, seq, state) rows, in that order; ones deleted meanwhile are left out."""
        if not rows:
            return []
        stream = self._key("stream")
        pipe = self.redis.pipeline(transaction=False)
        for _, seq, _ in rows:
            pipe.xrange(stream, f"{seq}-0", f"{seq}-0", count=1)
        entries = [e[0][1] if e else None for e in pipe.execute()]
        refs = [rid for (rid, _, _), e in zip(rows, entries) if e and e.get(b"input_ref") == b"1"]
        keys = sorted({e[b"req"] for e in entries if e and b"req" in e})
        pipe = self.redis.pipeline(transaction=False)
        if refs:
            pipe.mget([self._key(f"blob:{rid}") for rid in refs])
        for key in keys:
            pipe.hmget(self._key(f"req:{key.decode()}"), ["request_id", "metadata"])
        answers = pipe.execute()
        blobs = dict(zip(refs, answers.pop(0))) if refs else {}
        requests = {key: (rid.decode(), json.loads(meta)) for key, (rid, meta) in zip(keys, answers) if rid is not None}
        out = []
        for (rid, _, state), e in zip(rows, entries):
            if not e or (rid in blobs and blobs[rid] is None) or (b"req" in e and e[b"req"] not in requests):
                continue
            out.append(self._decode(e, state, blobs.get(rid), requests.get(e.get(b"req"))))
        return out

    # -- writes ---------------------------------------------------------------------------------------
    def _run_put(self, items: Sequence[SpoolRecord], requests: Sequence[SpoolRequest], admit: bool,
                 runs: Sequence = (0, 0), client: redis.Redis | None = None) -> list[int | bytes]:
        """The put script for ``items`` (``runs``: the idempotency part of its arguments, :meth:`_runs`; none by
        default) through ``client`` (default: the one of other calls); each one's status (1 stored, 2 already
        there, 0 refused; the earlier record's id for a record of a retried request)."""
        argv: list = [self.max_size, self.max_bytes, self.full_policy, "1" if admit else "0", len(requests)]
        for request in requests:
            argv += request
        argv += runs
        argv.append(len(items))
        for rec in items:
            argv += [rec[0], rec[1], rec[2], len(rec) - 3, *rec[3:]]
        out = self._put_script(keys=[self.key_prefix], args=argv, client=client or self.redis)
        self._reachable = True
        self._drops.note("evicted", [rid.decode() for rid in out[len(items):]])
        return [x if isinstance(x, bytes) else int(x) for x in out[:len(items)]]

    def _runs(self, records: Sequence[NewRecord], items: Sequence[SpoolRecord]) -> list:
        """The put script's idempotency arguments for ``records`` (encoded as ``items``): the window in
        milliseconds, then the runs that may be retries (:func:`request_runs`) with each record's item position
        and input digest; no runs with the check off."""
        if not self.idempotency_window_s:
            return [0, 0]
        runs = request_runs(records)
        argv: list = [max(1, round(self.idempotency_window_s * 1000)), len(runs)]
        for run in runs:
            argv += [run.start + 1, run.stop - run.start, run.model, run.request_id]
            for item, encoded in zip(run.items, items[run.start:run.stop]):
                argv += [b"" if item is None else str(item), _input_digest(encoded)]
        return argv

    def put(self, records: Sequence[NewRecord]) -> list[str | None]:
        return self.put_prepared(self.prepare(records))

    def prepare(self, records: Sequence[NewRecord]) -> Prepared:
        """(ids, the script's items, request payloads, each record's request id, the idempotency arguments)."""
        now = time.time()
        ids = new_record_ids(len(records), now)
        items, requests = self._encode(records, ids, now)
        return ids, items, requests, [r.request_id for r in records], self._runs(records, items)

    def put_prepared(self, prepared: Prepared) -> list[str | None]:
        self._check_open()
        ids, items, requests, request_ids, runs = prepared
        if not ids:
            return []
        found_down = False
        if not self._down:
            try:
                result = self._run_put(items, requests, admit=False, runs=runs, client=self._put_redis)
                self._drops.note("refused", [rid for rid, status in zip(request_ids, result) if status == 0])
                return [status.decode() if isinstance(status, bytes) else rid if status else None
                        for rid, status in zip(ids, result)]
            except UNREACHABLE as exc:
                self._reachable, self._down, found_down = False, True, True
                log.warning("redis queue %s unreachable (%s): spooling to %s", self.key_prefix, exc, self.spool.path)
            except rx.RedisError as exc:
                raise QueueError(f"redis queue {self.key_prefix}: {exc}") from exc
        # Redis is unreachable (maybe the write landed before the connection broke: replay dedups by id)
        self.spool.append(items, requests)
        if found_down:  # the replay thread probes Redis from now on (puts while it does so leave it alone)
            self._wake.set()
        return ids

    def replay_spool(self) -> int:
        """Write the spool into Redis (dedup by id) and cut what landed off it; returns records written.
        Raises one of :data:`UNREACHABLE` (or :class:`QueueError`) if Redis fails; what landed is cut anyway."""
        with self._replay_lock:
            frames = self.spool.snapshot()
            if not frames:
                return 0
            done_offset = done_records = written = 0
            try:
                for offset, frame, requests in frames:
                    for start in range(0, len(frame), self.replay_batch):
                        # every chunk carries the frame's request payloads: the script stores what it references
                        result = self._run_put(frame[start:start + self.replay_batch], requests, admit=True)
                        written += result.count(1)
                        self.replay_duplicates += result.count(2)
                    done_offset, done_records = offset, done_records + len(frame)
            finally:
                self.spool.drop_prefix(done_offset, done_records)
                self.replayed += written
                if done_records:
                    log.info("redis queue %s: replayed %d spooled record(s) (%d already there), %d left",
                             self.key_prefix, written, done_records - written, self.spool.backlog)
            return written

    def _replay_loop(self) -> None:
        """While the spool holds records or puts avoid Redis: every ``connect_retry_s``, replay the spool (or
        PING Redis when it is empty); when that works, puts use Redis again."""
        while not self._stop.is_set():
            if self.spool.backlog > 0 or self._down:
                try:
                    if self.spool.backlog > 0:
                        self.replay_spool()
                    else:
                        self.redis.ping()
                    self._reachable, self._down = True, False
                except UNREACHABLE:
                    self._reachable, self._down = False, True
                except Exception:  # a bug or a disk error: keep the spool, try again later
                    log.exception("redis queue %s: spool replay failed", self.key_prefix)
            self._wake.wait(self.connect_retry_s if self.spool.backlog > 0 or self._down else 5.0)
            self._wake.clear()

    def claim(self, limit: int, flagged: bool | None = None) -> list[QueueRecord]:
        if limit <= 0:
            self._check_open()
            return []
        which = "*" if flagged is None else ("1" if flagged else "0")
        out = self._call(self._claim_script, keys=[self.key_prefix], args=[int(limit), which])
        rows = [(out[j].decode(), int(out[j + 1]), CLAIMED) for j in range(0, len(out), 3)]
        return self._call(self._fetch, rows)

    def _move(self, ids: Sequence[str], to_state: str, from_states: tuple[str, ...]) -> list[str]:
        if not ids:
            self._check_open()
            return []
        moved = self._call(self._move_script, keys=[self.key_prefix], args=[to_state, ",".join(from_states), *ids])
        return [m.decode() for m in moved]

    def claim_ids(self, ids: Sequence[str]) -> list[str]:
        return self._move(ids, CLAIMED, (PENDING,))

    def release(self, ids: Sequence[str]) -> int:
        return len(self._move(ids, PENDING, (CLAIMED,)))

    def mark_sent(self, ids: Sequence[str]) -> int:
        return len(self._move(ids, SENT, (PENDING, CLAIMED)))

    def delete(self, ids: Sequence[str]) -> int:
        ids = list(dict.fromkeys(ids))
        if not ids:
            self._check_open()
            return 0
        return sum(int(self._call(self._delete_script, keys=[self.key_prefix], args=ids[start:start + 1000]))
                   for start in range(0, len(ids), 1000))

    def purge_sent(self) -> int:
        total = 0
        while True:
            n = int(self._call(self._purge_script, keys=[self.key_prefix], args=[1000]))
            total += n
            if n < 1000:
                return total

    # -- reads ----------------------------------------------------------------------------------------
    def get(self, ids: Sequence[str]) -> list[QueueRecord]:
        if not ids:
            self._check_open()
            return []
        values = self._call(self.redis.hmget, self._key("rec"), list(ids))
        rows = []
        for rid, v in zip(ids, values):
            if v is not None:
                seq, _, state = v.decode().split(":")[:3]
                rows.append((rid, int(seq), state))
        return self._call(self._fetch, rows)

    def select(self, limit: int | None = None, state: str = PENDING, flagged: bool | None = None,
               model: str | None = None, version: int | None = None, since: float | None = None,
               until: float | None = None) -> list[QueueRecord]:
        if state not in STATES:
            raise ValueError(f"state must be one of {STATES}, got {state!r}")
        self._check_open()
        if limit is not None and limit <= 0:
            return []
        filtered = not (model is None and version is None and since is None and until is None)
        flags = ["1", "0"] if flagged is None else (["1"] if flagged else ["0"])
        stop = -1 if limit is None or filtered else int(limit) - 1
        pipe = self.redis.pipeline(transaction=False)
        for f in flags:
            pipe.zrange(self._key(f"z:{state}:{f}"), 0, stop, withscores=True)
        rows = sorted(((m.decode(), int(s), state) for part in self._call(pipe.execute) for m, s in part),
                      key=lambda row: row[1])
        if filtered:  # oldest first, a chunk at a time, until ``limit`` match: only their entries are read
            version = None if version is None else int(version)
            matched = []
            for start in range(0, len(rows), 1000):
                chunk = rows[start:start + 1000]
                for row, info in zip(chunk, self._call(self._info, chunk)):
                    if info is None:
                        continue  # deleted meanwhile
                    t, v, m = info
                    if ((model is None or m == model) and (version is None or v == version)
                            and (since is None or t >= since) and (until is None or t < until)):
                        matched.append(row)
                if limit is not None and len(matched) >= limit:
                    break
            rows = matched
        if limit is not None:
            rows = rows[:limit]
        return self._call(self._fetch, rows)

    def _info(self, rows: Sequence[tuple[str, int, str]]) -> list[tuple[float, int, str] | None]:
        """(time, version, model) of (id, seq, state) rows from ``P:info``; the stream entry of a record stored by
        an older version (no ``P:info``); None for a record deleted meanwhile."""
        if not rows:
            return []
        values = self.redis.hmget(self._key("info"), [rid for rid, _, _ in rows])
        out: list[tuple[float, int, str] | None] = []
        for value in values:
            if value is None:
                out.append(None)
            else:
                t, v, m = value.decode().split(":", 2)
                out.append((float(t), int(v), m))
        old = [j for j, value in enumerate(values) if value is None]
        if old:  # entries of an older version (or deleted records): the stream entry holds the fields
            pipe = self.redis.pipeline(transaction=False)
            for j in old:
                seq = rows[j][1]
                pipe.xrange(self._key("stream"), f"{seq}-0", f"{seq}-0", count=1)
            for j, entry in zip(old, pipe.execute()):
                if entry:
                    f = entry[0][1]
                    out[j] = (float(f[b"time"]), int(f[b"version"]), f[b"model"].decode())
        return out

    def summary(self) -> list[SummaryRow]:
        self._check_open()
        rows = []
        for rid, value in self._call(lambda: list(self.redis.hscan_iter(self._key("rec"), count=1000))):
            seq, flag, state = value.decode().split(":")[:3]
            rows.append((rid.decode(), int(seq), state, flag == "1"))
        groups: dict[tuple[str, int, str, bool], list] = {}
        for start in range(0, len(rows), 1000):
            chunk = rows[start:start + 1000]
            infos = self._call(self._info, [(rid, seq, state) for rid, seq, state, _ in chunk])
            for (_, _, state, flagged), info in zip(chunk, infos):
                if info is None:
                    continue  # deleted meanwhile
                t, version, model = info
                group = groups.setdefault((model, version, state, flagged), [0, t, t])
                group[0] += 1
                group[1], group[2] = min(group[1], t), max(group[2], t)
        return [SummaryRow(model=m, version=v, state=st, flagged=f, count=n, oldest=lo, newest=hi)
                for (m, v, st, f), (n, lo, hi) in sorted(groups.items())]

    def stats(self) -> QueueStats:
        pipe = self.redis.pipeline(transaction=False)
        for state in STATES:
            for f in ("1", "0"):
                pipe.zcard(self._key(f"z:{state}:{f}"))
        pipe.hgetall(self._key("counters"))
        pipe.get(self._key("bytes"))
        *cards, counters, used = self._call(pipe.execute)
        n = {(state, f): cards[2 * i + j] for i, state in enumerate(STATES) for j, f in enumerate(("1", "0"))}
        counters = {k.decode(): int(v) for k, v in counters.items()}
        pending, claimed = n[(PENDING, "1")] + n[(PENDING, "0")], n[(CLAIMED, "1")] + n[(CLAIMED, "0")]
        return QueueStats(
            size=pending + claimed, pending=pending, claimed=claimed, sent=n[(SENT, "1")] + n[(SENT, "0")],
            flagged=n[(PENDING, "1")] + n[(CLAIMED, "1")], sampled=n[(PENDING, "0")] + n[(CLAIMED, "0")],
            max_size=self.max_size, full_policy=self.full_policy, accepted=counters.get("accepted", 0),
            rejected=counters.get("rejected", 0), evicted=counters.get("evicted", 0),
            spool_backlog=self.spool.backlog, bytes=int(used or 0), max_bytes=self.max_bytes,
        )

    def local_state(self) -> LocalQueueState:
        return LocalQueueState(spool_backlog=self.spool.backlog, reachable=self._reachable)

    def close(self) -> None:
        """Stop the replay thread (one last replay if Redis answers); what is still spooled stays for the next
        start. Later calls raise :class:`QueueError`."""
        if self._closed:
            return
        self._stop.set()
        self._wake.set()
        self._thread.join(30)
        if self.spool.backlog:
            try:
                self.replay_spool()
            except Exception as exc:  # noqa: BLE001 - the spool keeps the records for the next start
                log.warning("redis queue %s: %d record(s) stay spooled in %s (%s)", self.key_prefix,
                            self.spool.backlog, self.spool.path, exc)
        self._closed = True
        self._drops.flush()
        self.spool.close()
        self.redis.close()
        if self._put_redis is not self.redis:
            self._put_redis.close()


__all__ = ["RedisQueue", "Spool", "UNREACHABLE", "DEFAULT_PREFIX", "DEFAULT_INLINE_MAX_BYTES", "worker_spool_path",
           "adopt_orphan_spools"]
