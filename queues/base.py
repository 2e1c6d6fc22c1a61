"""The active-learning query queue interface: where flagged (and sampled) items wait for harvest.

A record is one batch item: its model input, logits, features, every score, the decision, and the
request's id and metadata. Records move ``pending`` → ``claimed`` (by a harvest, :meth:`QueryQueue.claim`)
→ ``sent`` (:meth:`QueryQueue.mark_sent`, e.g. handed to the relabeling tool). The queue is bounded: at
most ``max_size`` unharvested (pending or claimed) records; a full queue either rejects new records or
evicts the oldest pending ones, and counts both. The bound is in records (``max_size``) and in bytes
(``max_bytes``: the stored size of unharvested records, request rows included).

A request's id and metadata are stored once per request, not once per record: records of one ``put`` that
share ``request_id`` and ``metadata`` reference one request row (a 1 MB metadata value on a 64-item request
costs 1 MB, not 64).

Records a full queue drops (evicted, refused) leave a rate-limited WARNING line (:class:`DropLog`).

A retried request is queued once (idempotency): a client whose call was queued but got no answer (the gateway
died before replying) sends it again with the same ``request_id``. When a ``put`` holds records of a model and
a non-empty request id, and records of that model and request id were stored within ``idempotency_window_s``
with the same item positions (``decision["item"]``) and the same inputs, the ``put`` stores none of them and
returns the earlier records' ids, item for item (:func:`request_runs` says which records of a ``put`` form one
request). Otherwise (other item positions or other inputs: not a retry) they are stored as usual; the inputs are
compared so that a client reusing one request id for new inputs cannot keep them out of the queue. The check runs
in the store, atomically with the write, so it holds across gateway processes and restarts. A store checks only
when given a window (0, its default, turns the check off); the gateway passes its ``queue_idempotency_window_s``
setting.

:meth:`QueryQueue.local_state` answers from the process's own memory, never from the store: metrics read it
during a store outage (spool backlog, whether the last store call worked).
"""

from __future__ import annotations

import abc
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

PENDING, CLAIMED, SENT = "pending", "claimed", "sent"
STATES = (PENDING, CLAIMED, SENT)
DEFAULT_MAX_BYTES = 1024 ** 3
#: what a full queue does with a new record: refuse it, or evict the oldest pending records to make room
FULL_POLICIES = ("reject", "evict-oldest")


def check_bounds(max_size: int, max_bytes: int, full_policy: str, idempotency_window_s: float) -> None:
    """The settings every store takes, checked alike (ValueError naming the bad one)."""
    if max_size < 1:
        raise ValueError(f"max_size must be >= 1, got {max_size}")
    if max_bytes < 1:
        raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
    if full_policy not in FULL_POLICIES:
        raise ValueError(f"full_policy must be one of {FULL_POLICIES}, got {full_policy!r}")
    if not 0 <= idempotency_window_s < float("inf"):
        raise ValueError(f"idempotency_window_s must be a number of seconds >= 0, got {idempotency_window_s}")


def new_record_ids(count: int, now: float) -> list[str]:
    """``count`` fresh record ids, in increasing order: UUIDv7 (RFC 9562) as 32 lowercase hex digits, the layout of
    the uuid4 hex ids before them (readers see the same kind of string). The first 48 bits are ``now`` in unix
    milliseconds; the 12 bits after the version nibble 7 are the fraction of that millisecond (RFC 9562's
    "increased clock precision", about 0.24 us steps); then the variant bits 10 and 62 random bits.

    Why time-ordered: the SQLite queue's ``id`` column is UNIQUE, a B-tree index. Random uuid4 ids land on a random
    leaf each, so a micro-batch's transaction dirtied about one index page per record and wrote each to the WAL;
    increasing ids append to the index's last page. Measured on a queue of 52,000 records, 21 records per
    transaction: 36-48 us of CPU per record with uuid4, 22-27 with increasing ids (wall 53-65 against 33-38 us);
    ids sharing the millisecond but random below it (plain UUIDv7) cost 27-34. Order is not identity: ``seq`` stays the
    queue's order. 62 random bits per 0.24 us keep collisions out of reach (a collision would fail the
    transaction on the UNIQUE index, never overwrite a record)."""
    ticks = int(now * 1000 * 4096) & 0xFFFF_FFFF_FFFF_FFF  # 48 bits of milliseconds, 12 of its fraction
    head = ((ticks >> 12) << 80) | (0x7 << 76) | ((ticks & 0xFFF) << 64) | (0b10 << 62)
    randomness = os.urandom(8 * count)
    tails = sorted(int.from_bytes(randomness[8 * k:8 * k + 8], "big") & 0x3FFF_FFFF_FFFF_FFFF for k in range(count))
    return [f"{head | tail:032x}" for tail in tails]


class QueueError(RuntimeError):
    """The queue cannot store or read records (closed, disk error)."""


def decisions_json(decisions: Sequence[dict]) -> list[str]:
    """``json.dumps`` of each record's decision, a ``thresholds`` dict that several of them share encoded once.

    The gateway's decisions of one model version all hold the same thresholds dict object (the version's rule
    builds it once, :class:`oodguard.serve.decision.Decisions`), and a queue write holds a micro-batch of them:
    the thresholds were a third of the floats whose text made JSON the largest CPU cost of preparing a record.
    Each thresholds dict's JSON is spliced in as the object's last member: the same object as ``json.loads``
    sees it (members in another order). Decisions without thresholds are encoded as they are."""
    shared: dict[int, str] = {}  # id of a thresholds dict -> its JSON (the dicts live as long as this call)
    out = []
    for d in decisions:
        thresholds = d.get("thresholds")
        if not (isinstance(thresholds, dict) and thresholds):
            out.append(json.dumps(d))
            continue
        text = shared.get(id(thresholds))
        if text is None:
            text = shared[id(thresholds)] = json.dumps(thresholds)
        rest = json.dumps({k: v for k, v in d.items() if k != "thresholds"})
        out.append(f'{rest[:-1]}, "thresholds": {text}}}' if rest != "{}" else f'{{"thresholds": {text}}}')
    return out


@dataclass
class NewRecord:
    """What the gateway queues for one item."""

    model: str
    version: int
    input: np.ndarray
    logits: np.ndarray
    features: np.ndarray
    scores: dict[str, float]
    decision: dict
    flagged: bool  # False: queued as part of the unflagged traffic sample
    request_id: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    time: float | None = None  # seconds since the epoch; None = now


@dataclass
class QueueRecord(NewRecord):
    """A stored record."""

    id: str = ""
    seq: int = 0  # insertion order
    state: str = PENDING


@dataclass(frozen=True)
class RequestRun:
    """Records ``start:stop`` of a ``put``: one request of ``model`` and ``request_id`` that may be a retry;
    ``items``: each record's position in its request (None where its decision carries none: a run with one
    is never taken for a retry)."""

    start: int
    stop: int
    model: str
    request_id: str
    items: tuple[int | None, ...]


def record_item(record: NewRecord) -> int | None:
    """The record's position in its request, ``decision["item"]`` (set by the gateway), if an int."""
    item = record.decision.get("item") if isinstance(record.decision, dict) else None
    return item if type(item) is int else None


def request_runs(records: Sequence[NewRecord]) -> list[RequestRun]:
    """The requests of a ``put`` that the idempotency check looks at: each longest stretch of consecutive
    records of one model and one non-empty request id in which no item position repeats. The gateway's records
    of one request are consecutive; two copies of a request in one ``put`` (a retry written together with its
    original) are two runs, and the second finds the first's records."""
    runs: list[RequestRun] = []
    key: tuple[str, str] | None = None
    start, items = 0, []
    for j, r in enumerate([*records, None]):  # None closes the last run
        item = None if r is None else record_item(r)
        here = (r.model, r.request_id) if r is not None and r.request_id else None
        if here != key or (item is not None and item in items):
            if key is not None:
                runs.append(RequestRun(start, j, key[0], key[1], tuple(items)))
            key, start, items = here, j, []
        items.append(item)
    return runs


@dataclass(frozen=True)
class QueueStats:
    size: int  # unharvested records (pending + claimed): what max_size bounds
    pending: int
    claimed: int
    sent: int
    flagged: int  # unharvested flagged records
    sampled: int  # unharvested sampled (unflagged) records
    max_size: int
    full_policy: str
    accepted: int  # records ever stored
    rejected: int  # records refused because the queue was full (policy "reject")
    evicted: int  # pending records dropped to make room (policy "evict-oldest")
    spool_backlog: int = 0  # acknowledged records waiting in a local spool for the store (Redis queue)
    bytes: int = 0  # stored bytes of unharvested records (what max_bytes bounds)
    max_bytes: int = 0


@dataclass(frozen=True)
class SummaryRow:
    """One group of :meth:`QueryQueue.summary`."""

    model: str
    version: int
    state: str
    flagged: bool
    count: int
    oldest: float  # record time, seconds since the epoch
    newest: float


@dataclass(frozen=True)
class LocalQueueState:
    """What the queue knows without asking its store (no I/O; safe to read during an outage)."""

    spool_backlog: int  # acknowledged records waiting in the local spool (0 for a queue without one)
    reachable: bool  # False while the store is known to be unreachable (the last store call failed)


class DropLog:
    """Rate-limited WARNING lines about records a full queue dropped, so that an overload leaves a trace without
    a line per request: at most one line per ``interval_s`` per kind (``evicted``: record ids; ``refused``:
    request ids), with the count since the last line and its first few ids. What is held back rides on the next
    line of its kind, or on :meth:`flush` (at close)."""

    SHOWN = 5
    MESSAGES = {
        "evicted": "query queue %s: evicted %d pending record(s) to make room (first ids: %s)",
        "refused": "query queue %s full: refused %d record(s) (first requests: %s)",
    }

    def __init__(self, logger: logging.Logger, queue_name: str, interval_s: float = 1.0):
        self.logger, self.queue_name, self.interval_s = logger, queue_name, interval_s
        self._lock = threading.Lock()
        self._held = {kind: (0, []) for kind in self.MESSAGES}  # kind -> (count, first ids) since its last line
        self._last = {kind: float("-inf") for kind in self.MESSAGES}

    def note(self, kind: str, ids: Sequence[str]) -> None:
        if not ids:
            return
        with self._lock:
            count, shown = self._held[kind]
            new = [i for i in dict.fromkeys(ids) if i and i not in shown]
            self._held[kind] = (count + len(ids), (shown + new)[:self.SHOWN])
            now = time.monotonic()
            if now - self._last[kind] < self.interval_s:
                return
            self._last[kind] = now
            line, self._held[kind] = self._held[kind], (0, [])
        self._warn(kind, *line)

    def flush(self) -> None:
        with self._lock:
            lines = [(kind, *line) for kind, line in self._held.items() if line[0]]
            self._held = {kind: (0, []) for kind in self.MESSAGES}
        for line in lines:
            self._warn(*line)

    def _warn(self, kind: str, count: int, shown: list[str]) -> None:
        self.logger.warning(self.MESSAGES[kind], self.queue_name, count, ", ".join(shown) or "-")


class QueryQueue(abc.ABC):
    """Thread-safe; the gateway calls it from worker threads, never on its event loop."""

    @abc.abstractmethod
    def put(self, records: Sequence[NewRecord]) -> list[str | None]:
        """Store ``records`` durably in one transaction; returns each record's id, or None where the
        full-queue policy refused it (for the records of a retried request: the ids of its earlier records, see the
        module docstring). The same as ``put_prepared(prepare(records))``."""

    def prepare(self, records: Sequence[NewRecord]) -> object:
        """The CPU-only part of :meth:`put` (ids, packed arrays, JSON; no I/O, no lock), for
        :meth:`put_prepared`. The gateway runs it on its event loop and only the store's part in a thread: the
        encoding in a worker thread pays for GIL hand-offs with the busy loop (docs/benchmarks.md,
        "base: where a record is encoded")."""
        return list(records)

    def put_prepared(self, prepared: object) -> list[str | None]:
        """Store what :meth:`prepare` returned (as :meth:`put`)."""
        return self.put(prepared)

    @abc.abstractmethod
    def get(self, ids: Sequence[str]) -> list[QueueRecord]:
        """The records with these ids that still exist, in the order asked."""

    @abc.abstractmethod
    def select(self, limit: int | None = None, state: str = PENDING, flagged: bool | None = None,
               model: str | None = None, version: int | None = None, since: float | None = None,
               until: float | None = None) -> list[QueueRecord]:
        """Read records in ``state`` (oldest first) without changing them. Filters (None = any): ``flagged``,
        ``model``, ``version``, and the record's time: ``since <= time < until`` (seconds since the epoch)."""

    @abc.abstractmethod
    def summary(self) -> list["SummaryRow"]:
        """Record counts by (model, version, state, flagged) with the oldest and newest record time of each
        group, sorted by those keys; no arrays are read."""

    @abc.abstractmethod
    def delete(self, ids: Sequence[str]) -> int:
        """Delete these records, whatever their state (and request rows no record references any more);
        returns how many were deleted. Deleted records count neither as evicted nor as sent."""

    @abc.abstractmethod
    def claim(self, limit: int, flagged: bool | None = None) -> list[QueueRecord]:
        """Atomically move up to ``limit`` oldest pending records to ``claimed`` and return them."""

    @abc.abstractmethod
    def claim_ids(self, ids: Sequence[str]) -> list[str]:
        """Atomically move the given records from ``pending`` to ``claimed``; returns the ids this call
        claimed (records already claimed or sent by someone else are left out)."""

    @abc.abstractmethod
    def release(self, ids: Sequence[str]) -> int:
        """Return claimed records to ``pending`` (a harvest gave up); returns how many moved."""

    @abc.abstractmethod
    def mark_sent(self, ids: Sequence[str]) -> int:
        """Mark records as sent (harvested); they no longer count towards ``max_size``."""

    @abc.abstractmethod
    def purge_sent(self) -> int:
        """Delete sent records; returns how many."""

    @abc.abstractmethod
    def stats(self) -> QueueStats: ...

    @abc.abstractmethod
    def local_state(self) -> LocalQueueState:
        """Spool backlog and reachability from this process's memory: never blocks on the store."""

    @abc.abstractmethod
    def close(self) -> None:
        """Flush and close; later calls raise :class:`QueueError`."""
