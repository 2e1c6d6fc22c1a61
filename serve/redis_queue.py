"""The query queue on Redis Streams, with a local spool so that no acknowledged record is lost while Redis
is unreachable.

Keys (``P`` = ``key_prefix``, default ``oodguard:queue``; standalone Redis, not Redis Cluster):

=====================  ==================================================================================
``P:stream``           the stream: one entry per record, entry id ``<seq>-0``. Fields: ``id``, ``seq``,
                       ``time``, ``model``, ``version``, ``flagged``, ``request_id``, ``metadata`` /
                       ``scores`` / ``decision`` (JSON), ``logits`` / ``features`` / ``input`` (``np.save``
                       bytes compressed with zlib, as in the SQLite queue). An input whose compressed bytes
                       exceed ``inline_max_bytes`` is stored in ``P:blob:<id>`` instead (field
                       ``input_ref`` = ``1``); the blob is deleted with the record.
``P:rec``              hash: record id -> ``"<seq>:<flag 1|0>:<state>"`` (the mutable state; stream entries
                       are never rewritten)
``P:z:<state>:<flag>`` sorted sets of record ids scored by ``seq``, one per state (pending / claimed / sent)
                       and flag (1 = flagged, 0 = sampled): oldest-first order for select / claim
``P:seen``             set of every record id ever stored (dedup; never shrinks, ~50-80 bytes per id)
``P:seq``              insertion counter
``P:counters``         hash: accepted, rejected, evicted
=====================  ==================================================================================

Atomicity: every write is one Lua script (Redis runs each one atomically): ``put`` checks ``P:seen``,
applies the bound / full policy, and adds the entry, its state and its id in one step, so "check id + add"
cannot race and a record id lands at most once; ``claim`` pops the oldest pending ids and marks them claimed
in one step, so two concurrent harvests never get the same record.

Durability: a ``put`` returns once Redis has answered the script; run Redis with ``appendonly yes`` and
``appendfsync always`` for that to mean "on disk" (the queue does not configure the server).

Spool: when Redis is unreachable (connection refused / reset, timeout, loading, read-only, OOM), ``put``
assigns the ids as usual, appends the records to ``spool_path`` (one frame per ``put``:
``b"OGSP" | u32 length | u32 crc32 | payload``, payload = u32 record count, then per record u32 item count
and items ``id, flag, blob, field, value, ...`` each as u32 length + bytes), ``fsync``s it, and returns the
ids. A background thread replays the spool into Redis when it answers again (and once at start-up: crash
recovery), through the same script with dedup by id, and cuts the replayed frames off the spool only after
Redis accepted them; a crash in between replays them again, which dedup makes harmless. A torn last frame
(a crash during an append, never acknowledged) is dropped when the spool is opened. Replayed records are
always admitted: under ``evict-oldest`` older pending records are evicted for them as usual, under
``reject`` the queue may exceed ``max_size`` by at most the spool backlog (those records were already
acknowledged). One spool file belongs to one process. For ``connect_retry_s`` after a failure, puts go to
the spool without trying Redis (the replay thread probes it).
"""

from __future__ import annotations

import json
import logging
import os
import struct
import threading
import time
import uuid
import zlib
from pathlib import Path
from typing import Sequence

import redis
import redis.exceptions as rx
from redis.backoff import NoBackoff
from redis.retry import Retry

from .queue import CLAIMED, PENDING, SENT, STATES, NewRecord, QueryQueue, QueueError, QueueRecord, QueueStats
from .sqlite_queue import FULL_POLICIES, pack_array, unpack_array

log = logging.getLogger("oodguard.serve.redis_queue")

#: errors that mean "Redis cannot take the write now": the records go to the spool
UNREACHABLE = (rx.ConnectionError, rx.TimeoutError, rx.ReadOnlyError, rx.MasterDownError, rx.OutOfMemoryError,
               ConnectionError, TimeoutError)

DEFAULT_PREFIX = "oodguard:queue"
DEFAULT_INLINE_MAX_BYTES = 256 * 1024

# ARGV: max_size, policy, admit (1: ignore the bound: replayed records), n, then per record:
#   id, flag, blob ('' = input inline), nfields, field, value, ...
# Returns per record: 1 stored, 2 already stored (dedup), 0 refused (queue full).
PUT_LUA = r"""
local P = KEYS[1]
local max_size, policy, admit, n = tonumber(ARGV[1]), ARGV[2], ARGV[3] == '1', tonumber(ARGV[4])
local rec, seen = P .. ':rec', P .. ':seen'
local first = tonumber(redis.call('GET', P .. ':seq') or '0') + 1
local cur = redis.call('ZCARD', P .. ':z:pending:1') + redis.call('ZCARD', P .. ':z:pending:0')
          + redis.call('ZCARD', P .. ':z:claimed:1') + redis.call('ZCARD', P .. ':z:claimed:0')
local out, accepted, rejected, evicted = {}, 0, 0, 0
local i = 5
for k = 1, n do
  local id, flag, blob, nf = ARGV[i], ARGV[i + 1], ARGV[i + 2], tonumber(ARGV[i + 3])
  local fields = {}
  for j = 1, nf do fields[j] = ARGV[i + 3 + j] end
  i = i + 4 + nf
  if redis.call('SISMEMBER', seen, id) == 1 then
    out[k] = 2
  else
    if cur >= max_size and policy == 'evict-oldest' then
      -- the oldest pending record stored before this call (never one of this call's records)
      local victim, vflag, vseq = nil, nil, nil
      for _, f in ipairs({'1', '0'}) do
        local r = redis.call('ZRANGEBYSCORE', P .. ':z:pending:' .. f, '-inf', '(' .. first, 'WITHSCORES', 'LIMIT', 0, 1)
        if r[1] and (vseq == nil or tonumber(r[2]) < vseq) then victim, vflag, vseq = r[1], f, tonumber(r[2]) end
      end
      if victim then
        redis.call('ZREM', P .. ':z:pending:' .. vflag, victim)
        redis.call('HDEL', rec, victim)
        redis.call('XDEL', P .. ':stream', string.format('%d-0', vseq))
        redis.call('DEL', P .. ':blob:' .. victim)
        cur = cur - 1
        evicted = evicted + 1
      end
    end
    if cur >= max_size and not admit then
      out[k] = 0
      rejected = rejected + 1
    else
      local seq = redis.call('INCR', P .. ':seq')
      if blob ~= '' then redis.call('SET', P .. ':blob:' .. id, blob) end
      redis.call('XADD', P .. ':stream', string.format('%d-0', seq), 'seq', tostring(seq), unpack(fields))
      redis.call('HSET', rec, id, string.format('%d:%s:pending', seq, flag))
      redis.call('ZADD', P .. ':z:pending:' .. flag, seq, id)
      redis.call('SADD', seen, id)
      cur = cur + 1
      accepted = accepted + 1
      out[k] = 1
    end
  end
end
if accepted > 0 then redis.call('HINCRBY', P .. ':counters', 'accepted', accepted) end
if rejected > 0 then redis.call('HINCRBY', P .. ':counters', 'rejected', rejected) end
if evicted > 0 then redis.call('HINCRBY', P .. ':counters', 'evicted', evicted) end
return out
"""

# ARGV: limit, which ('1', '0' or '*'). Returns id, seq, flag, id, seq, flag, ... of the claimed records.
CLAIM_LUA = r"""
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
  redis.call('ZREM', P .. ':z:pending:' .. f, id)
  redis.call('ZADD', P .. ':z:claimed:' .. f, seq, id)
  redis.call('HSET', P .. ':rec', id, string.format('%d:%s:claimed', seq, f))
  out[#out + 1] = id
  out[#out + 1] = string.format('%d', seq)
  out[#out + 1] = f
end
return out
"""

# ARGV: to_state, from_states (comma separated), ids... Returns the ids that moved.
MOVE_LUA = r"""
local P, to, from = KEYS[1], ARGV[1], ',' .. ARGV[2] .. ','
local moved = {}
for j = 3, #ARGV do
  local id = ARGV[j]
  local v = redis.call('HGET', P .. ':rec', id)
  if v then
    local seq, f, state = string.match(v, '^(%d+):(%d):(%a+)$')
    if string.find(from, ',' .. state .. ',', 1, true) then
      redis.call('ZREM', P .. ':z:' .. state .. ':' .. f, id)
      redis.call('ZADD', P .. ':z:' .. to .. ':' .. f, seq, id)
      redis.call('HSET', P .. ':rec', id, seq .. ':' .. f .. ':' .. to)
      moved[#moved + 1] = id
    end
  end
end
return moved
"""

# ARGV: most records to delete in this call. Returns how many were deleted.
PURGE_LUA = r"""
local P, limit = KEYS[1], tonumber(ARGV[1])
local n = 0
for _, f in ipairs({'1', '0'}) do
  local r = redis.call('ZRANGE', P .. ':z:sent:' .. f, 0, limit - n - 1, 'WITHSCORES')
  for j = 1, #r, 2 do
    redis.call('ZREM', P .. ':z:sent:' .. f, r[j])
    redis.call('HDEL', P .. ':rec', r[j])
    redis.call('XDEL', P .. ':stream', string.format('%d-0', tonumber(r[j + 1])))
    redis.call('DEL', P .. ':blob:' .. r[j])
    n = n + 1
  end
  if n >= limit then break end
end
return n
"""


# -- the spool --------------------------------------------------------------------------------------
SPOOL_MAGIC = b"OGSP"
_HEADER = struct.Struct("<4sII")  # magic, payload length, crc32
_U32 = struct.Struct("<I")

SpoolRecord = list  # [id, flag, blob, field, value, ...] as bytes


def _encode_frame(records: Sequence[SpoolRecord]) -> bytes:
    parts = [_U32.pack(len(records))]
    for items in records:
        parts.append(_U32.pack(len(items)))
        for item in items:
            parts.append(_U32.pack(len(item)))
            parts.append(item)
    payload = b"".join(parts)
    return _HEADER.pack(SPOOL_MAGIC, len(payload), zlib.crc32(payload)) + payload


def _decode_payload(payload: bytes) -> list[SpoolRecord]:
    pos = 0

    def u32() -> int:
        nonlocal pos
        (value,) = _U32.unpack_from(payload, pos)
        pos += 4
        return value

    records = []
    for _ in range(u32()):
        items = []
        for _ in range(u32()):
            length = u32()
            items.append(payload[pos:pos + length])
            pos += length
        records.append(items)
    return records


def _read_frames(data: bytes) -> tuple[int, list[tuple[int, list[SpoolRecord]]]]:
    """The valid frames at the start of ``data`` as (end offset, records), and where the last one ends (a torn
    or corrupt frame ends the scan)."""
    pos, frames = 0, []
    while pos + _HEADER.size <= len(data):
        magic, length, crc = _HEADER.unpack_from(data, pos)
        start = pos + _HEADER.size
        if magic != SPOOL_MAGIC or start + length > len(data):
            break
        payload = data[start:start + length]
        if zlib.crc32(payload) != crc:
            break
        pos = start + length
        frames.append((pos, _decode_payload(payload)))
    return pos, frames


class Spool:
    """An append-only, fsync'd file of put batches that Redis could not take. Thread-safe."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._open()
        data = self._read_all()
        end, frames = _read_frames(data)
        if end < len(data):  # a torn frame: its put never returned, so nobody holds its ids
            log.warning("spool %s: dropping %d bytes of an incomplete frame at the end", self.path, len(data) - end)
            os.ftruncate(self._fd, end)
            os.fsync(self._fd)
        self.backlog = sum(len(records) for _, records in frames)  # records waiting in the spool

    def _open(self) -> None:
        created = not self.path.exists()
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        if created:
            _fsync_dir(self.path.parent)

    def _read_all(self) -> bytes:
        size = os.fstat(self._fd).st_size
        return os.pread(self._fd, size, 0) if size else b""

    def append(self, records: Sequence[SpoolRecord]) -> None:
        frame = _encode_frame(records)
        with self._lock:
            if self._fd is None:
                raise QueueError(f"spool {self.path} is closed")
            before = os.fstat(self._fd).st_size
            try:
                view = memoryview(frame)
                while view:
                    view = view[os.write(self._fd, view):]
                os.fsync(self._fd)
            except OSError as exc:
                try:
                    os.ftruncate(self._fd, before)
                except OSError:
                    pass
                raise QueueError(f"spool {self.path}: {exc}") from exc
            self.backlog += len(records)

    def snapshot(self) -> list[tuple[int, list[SpoolRecord]]]:
        """The frames the spool holds now, as (end offset, records)."""
        with self._lock:
            if self._fd is None:
                raise QueueError(f"spool {self.path} is closed")
            return _read_frames(self._read_all())[1]

    def drop_prefix(self, offset: int, records: int) -> None:
        """Remove the first ``offset`` bytes (frames holding ``records`` records) once they are in Redis."""
        if offset <= 0:
            return
        with self._lock:
            if self._fd is None:
                return
            size = os.fstat(self._fd).st_size
            if size == offset:
                os.ftruncate(self._fd, 0)
                os.fsync(self._fd)
            else:  # frames appended meanwhile: rewrite them into a fresh file, atomically
                tail = os.pread(self._fd, size - offset, offset)
                tmp = self.path.with_name(self.path.name + ".tmp")
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                try:
                    view = memoryview(tail)
                    while view:
                        view = view[os.write(fd, view):]
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.replace(tmp, self.path)
                _fsync_dir(self.path.parent)
                os.close(self._fd)
                self._open()
            self.backlog = max(0, self.backlog - records)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- the queue --------------------------------------------------------------------------------------
def _b(value) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


class RedisQueue(QueryQueue):
    """:class:`QueryQueue` on one Redis database; see the module docstring for keys, atomicity and the spool."""

    def __init__(self, client: redis.Redis | str, spool_path: str | Path, max_size: int = 100_000,
                 full_policy: str = "reject", key_prefix: str = DEFAULT_PREFIX,
                 inline_max_bytes: int = DEFAULT_INLINE_MAX_BYTES, connect_retry_s: float = 0.5,
                 replay_batch: int = 256):
        if max_size < 1:
            raise ValueError(f"max_size must be >= 1, got {max_size}")
        if full_policy not in FULL_POLICIES:
            raise ValueError(f"full_policy must be one of {FULL_POLICIES}, got {full_policy!r}")
        if inline_max_bytes < 0:
            raise ValueError(f"inline_max_bytes must be >= 0, got {inline_max_bytes}")
        if not key_prefix:
            raise ValueError("key_prefix must not be empty")
        if isinstance(client, str):
            client = redis.Redis.from_url(client, socket_connect_timeout=2.0, socket_timeout=5.0,
                                          retry=Retry(NoBackoff(), 0), retry_on_error=[])
        self.redis = client
        self.max_size = max_size
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
        self._closed = False
        self._down_until = 0.0
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
            return fn(*args, **kwargs)
        except rx.RedisError as exc:
            raise QueueError(f"redis queue {self.key_prefix}: {exc}") from exc

    # -- records <-> stream entries -----------------------------------------------------------------
    def _encode(self, r: NewRecord, rid: str, now: float) -> SpoolRecord:
        flag = b"1" if r.flagged else b"0"
        packed = pack_array(r.input)
        blob = b""
        fields = {
            "id": rid, "time": repr(now if r.time is None else float(r.time)), "model": r.model,
            "version": str(int(r.version)), "flagged": flag, "request_id": r.request_id or "",
            "metadata": json.dumps({str(k): str(v) for k, v in (r.metadata or {}).items()}),
            "scores": json.dumps({k: float(v) for k, v in r.scores.items()}), "decision": json.dumps(r.decision),
            "logits": pack_array(r.logits), "features": pack_array(r.features),
        }
        if len(packed) > self.inline_max_bytes:
            blob, fields["input_ref"] = packed, b"1"
        else:
            fields["input"] = packed
        items = [rid.encode(), flag, blob]
        for name, value in fields.items():
            items += [name.encode(), _b(value)]
        return items

    @staticmethod
    def _decode(fields: dict, state: str, blob: bytes | None) -> QueueRecord:
        f = {k.decode(): v for k, v in fields.items()}
        packed = blob if f.get("input_ref") == b"1" else f["input"]
        return QueueRecord(
            model=f["model"].decode(), version=int(f["version"]), input=unpack_array(packed),
            logits=unpack_array(f["logits"]), features=unpack_array(f["features"]), scores=json.loads(f["scores"]),
            decision=json.loads(f["decision"]), flagged=f["flagged"] == b"1", request_id=f["request_id"].decode(),
            metadata=json.loads(f["metadata"]), time=float(f["time"]), id=f["id"].decode(), seq=int(f["seq"]),
            state=state,
        )

    def _fetch(self, rows: Sequence[tuple[str, int, str]]) -> list[QueueRecord]:
        """Records for (id, seq, state) rows, in that order; ones deleted meanwhile are left out."""
        if not rows:
            return []
        stream = self._key("stream")
        pipe = self.redis.pipeline(transaction=False)
        for _, seq, _ in rows:
            pipe.xrange(stream, f"{seq}-0", f"{seq}-0", count=1)
        entries = pipe.execute()
        refs = [rid for (rid, _, _), e in zip(rows, entries) if e and e[0][1].get(b"input_ref") == b"1"]
        blobs = dict(zip(refs, self.redis.mget([self._key(f"blob:{rid}") for rid in refs]))) if refs else {}
        out = []
        for (rid, _, state), e in zip(rows, entries):
            if not e or (rid in blobs and blobs[rid] is None):
                continue
            out.append(self._decode(e[0][1], state, blobs.get(rid)))
        return out

    # -- writes ---------------------------------------------------------------------------------------
    def _run_put(self, items: Sequence[SpoolRecord], admit: bool) -> list[int]:
        argv: list = [self.max_size, self.full_policy, "1" if admit else "0", len(items)]
        for rec in items:
            argv += [rec[0], rec[1], rec[2], len(rec) - 3, *rec[3:]]
        return [int(x) for x in self._put_script(keys=[self.key_prefix], args=argv)]

    def put(self, records: Sequence[NewRecord]) -> list[str | None]:
        self._check_open()
        if not records:
            return []
        now = time.time()
        ids = [uuid.uuid4().hex for _ in records]
        items = [self._encode(r, rid, now) for r, rid in zip(records, ids)]
        if time.monotonic() >= self._down_until:
            try:
                result = self._run_put(items, admit=False)
                return [rid if status else None for rid, status in zip(ids, result)]
            except UNREACHABLE as exc:
                self._down_until = time.monotonic() + self.connect_retry_s
                log.warning("redis queue %s unreachable (%s): spooling to %s", self.key_prefix, exc, self.spool.path)
            except rx.RedisError as exc:
                raise QueueError(f"redis queue {self.key_prefix}: {exc}") from exc
        # Redis is unreachable (maybe the write landed before the connection broke: replay dedups by id)
        self.spool.append(items)
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
                for offset, frame in frames:
                    for start in range(0, len(frame), self.replay_batch):
                        result = self._run_put(frame[start:start + self.replay_batch], admit=True)
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
        while not self._stop.is_set():
            if self.spool.backlog > 0:
                try:
                    self.replay_spool()
                    self._down_until = 0.0
                except UNREACHABLE:
                    self._down_until = time.monotonic() + self.connect_retry_s
                except Exception:  # a bug or a disk error: keep the spool, try again later
                    log.exception("redis queue %s: spool replay failed", self.key_prefix)
            self._wake.wait(self.connect_retry_s if self.spool.backlog > 0 else 5.0)
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
                seq, _, state = v.decode().split(":")
                rows.append((rid, int(seq), state))
        return self._call(self._fetch, rows)

    def select(self, limit: int | None = None, state: str = PENDING, flagged: bool | None = None) -> list[QueueRecord]:
        if state not in STATES:
            raise ValueError(f"state must be one of {STATES}, got {state!r}")
        flags = ["1", "0"] if flagged is None else (["1"] if flagged else ["0"])
        stop = -1 if limit is None else int(limit) - 1
        if stop < -1:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for f in flags:
            pipe.zrange(self._key(f"z:{state}:{f}"), 0, stop, withscores=True)
        rows = sorted(((m.decode(), int(s), state) for part in self._call(pipe.execute) for m, s in part),
                      key=lambda row: row[1])
        if limit is not None:
            rows = rows[:limit]
        return self._call(self._fetch, rows)

    def stats(self) -> QueueStats:
        pipe = self.redis.pipeline(transaction=False)
        for state in STATES:
            for f in ("1", "0"):
                pipe.zcard(self._key(f"z:{state}:{f}"))
        pipe.hgetall(self._key("counters"))
        *cards, counters = self._call(pipe.execute)
        n = {(state, f): cards[2 * i + j] for i, state in enumerate(STATES) for j, f in enumerate(("1", "0"))}
        counters = {k.decode(): int(v) for k, v in counters.items()}
        pending, claimed = n[(PENDING, "1")] + n[(PENDING, "0")], n[(CLAIMED, "1")] + n[(CLAIMED, "0")]
        return QueueStats(
            size=pending + claimed, pending=pending, claimed=claimed, sent=n[(SENT, "1")] + n[(SENT, "0")],
            flagged=n[(PENDING, "1")] + n[(CLAIMED, "1")], sampled=n[(PENDING, "0")] + n[(CLAIMED, "0")],
            max_size=self.max_size, full_policy=self.full_policy, accepted=counters.get("accepted", 0),
            rejected=counters.get("rejected", 0), evicted=counters.get("evicted", 0),
            spool_backlog=self.spool.backlog,
        )

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
        self.spool.close()
        self.redis.close()


__all__ = ["RedisQueue", "Spool", "UNREACHABLE", "DEFAULT_PREFIX", "DEFAULT_INLINE_MAX_BYTES"]
