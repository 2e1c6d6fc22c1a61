"""The query queue on Redis Streams, with a local spool so that no acknowledged record is lost while Redis
is unreachable.

The keys, what a record's bytes are and what each write does atomically: :mod:`oodguard.queues.redis_scripts`
(every write is one of its Lua scripts); records to and from stream entries: :mod:`oodguard.queues.redis_entries`.

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
                   QueueError, QueueRecord, QueueStats, SummaryRow, check_bounds, new_record_ids)
from .redis_entries import encode_records, fetch_records, idempotency_args, read_info
from .redis_scripts import CLAIM_LUA, DELETE_LUA, MOVE_LUA, PURGE_LUA, PUT_LUA
from .spool import Spool, SpoolRecord, SpoolRequest

log = logging.getLogger("oodguard.queues.redis_streams")

#: errors that mean "Redis cannot take the write now": the records go to the spool
UNREACHABLE = (rx.ConnectionError, rx.TimeoutError, rx.ReadOnlyError, rx.MasterDownError, rx.OutOfMemoryError,
               ConnectionError, TimeoutError)

DEFAULT_PREFIX = "oodguard:queue"
DEFAULT_INLINE_MAX_BYTES = 256 * 1024
#: the longest a put waits for Redis (to connect, for an answer) before it spools its records
DEFAULT_PUT_TIMEOUT_S = 0.5


#: what :meth:`RedisQueue.prepare` returns
Prepared = tuple[list[str], list[SpoolRecord], list[SpoolRequest], list[str], list]


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


class RedisQueue(QueryQueue):
    """:class:`QueryQueue` on one Redis database: the spool and reachability in the module docstring, the keys and
    what each write does atomically in :mod:`oodguard.queues.redis_scripts`."""

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

    # -- writes ---------------------------------------------------------------------------------------
    def _run_put(self, items: Sequence[SpoolRecord], requests: Sequence[SpoolRequest], admit: bool,
                 runs: Sequence = (0, 0), client: redis.Redis | None = None) -> list[int | bytes]:
        """The put script for ``items`` (``runs``: the idempotency part of its arguments, :func:`idempotency_args`;
        none by default) through ``client`` (default: the one of other calls); each one's status (1 stored, 2
        already there, 0 refused; the earlier record's id for a record of a retried request)."""
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

    def put(self, records: Sequence[NewRecord]) -> list[str | None]:
        return self.put_prepared(self.prepare(records))

    def prepare(self, records: Sequence[NewRecord]) -> Prepared:
        """(ids, the script's items, request payloads, each record's request id, the idempotency arguments)."""
        now = time.time()
        ids = new_record_ids(len(records), now)
        items, requests = encode_records(records, ids, now, self.inline_max_bytes)
        return (ids, items, requests, [r.request_id for r in records],
                idempotency_args(records, items, self.idempotency_window_s))

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
        return self._call(fetch_records, self.redis, self.key_prefix, rows)

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
        return self._call(fetch_records, self.redis, self.key_prefix, rows)

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
                for row, info in zip(chunk, self._call(read_info, self.redis, self.key_prefix, chunk)):
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
        return self._call(fetch_records, self.redis, self.key_prefix, rows)

    def summary(self) -> list[SummaryRow]:
        self._check_open()
        rows = []
        for rid, value in self._call(lambda: list(self.redis.hscan_iter(self._key("rec"), count=1000))):
            seq, flag, state = value.decode().split(":")[:3]
            rows.append((rid.decode(), int(seq), state, flag == "1"))
        groups: dict[tuple[str, int, str, bool], list] = {}
        for start in range(0, len(rows), 1000):
            chunk = rows[start:start + 1000]
            infos = self._call(read_info, self.redis, self.key_prefix,
                                [(rid, seq, state) for rid, seq, state, _ in chunk])
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


__all__ = ["RedisQueue", "Prepared", "redis_client", "UNREACHABLE", "DEFAULT_PREFIX", "DEFAULT_INLINE_MAX_BYTES",
           "DEFAULT_PUT_TIMEOUT_S"]
