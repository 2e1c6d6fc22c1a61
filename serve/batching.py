"""Micro-batching in front of any backend: concurrent requests for the same model version share one call.

:class:`MicroBatcher` keeps one lane of pending submissions per key (``(model, version)`` in the gateway)
and at most ``max_inflight`` batches running at once (the backend's capacity: one ONNX Runtime worker,
``--triton-inflight-batches`` calls in flight to Triton). It is *continuous* batching:

* a submission that finds a slot free and nothing pending leads the next batch: it yields once, so the
  submissions already runnable in this event-loop turn join it, and runs the batch; alone, it runs in
  its caller's own task, so at low load a request pays no hand-off (``max_wait_s = 0``, the default).
  Whether to yield is decided by the event loop's ready queue, not by the number of callers in progress:
  under load a burst of requests arrives in one event-loop turn before any of them is counted (a leader
  deciding by that count would run each burst's first request alone, at more CPU per request; figures:
  docs/benchmarks.md, "batching: when a leader yields"), but then the burst's other requests are in the
  ready queue. With nothing else due in this turn, a yield could gather no batch mate: the leader runs at
  once, without the extra loop turn;
* otherwise a free slot takes everything pending for a lane (whole submissions, up to the lane's row
  limit) on the next event-loop turn, so requests that arrived together go together;
* while every slot is busy, submissions pile up and the next free slot takes them as one batch, so
  batches grow with load and no timer is involved;
* ``max_wait_s > 0`` makes a free slot hold a lane smaller than its row limit until its oldest
  submission has waited that long (Triton's ``max_queue_delay``): fewer, larger batches at the price of
  up to that much latency at low load.

``run_batch(key, rows, timeout_s)`` does the work once per batch and returns any object; every
submission of the batch gets a :class:`Part`: that object plus its own row range, so it can slice what
it needs. A failure of ``run_batch`` is raised in every submission of the batch. A submission whose
caller gave up (deadline, cancellation) before its batch started is dropped from the batch.
"""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Generic, Hashable, TypeVar

import numpy as np

T = TypeVar("T")


class BatchDeadlineExceeded(Exception):
    """The submission's timeout passed before its batch answered."""


@dataclass(frozen=True)
class Part(Generic[T]):
    """A submission's share of a batch result: ``result`` of the whole batch, rows ``start:stop``."""

    result: T
    start: int
    stop: int
    batch_rows: int  # rows of the whole batch (metrics and tests read it)


@dataclass
class _Pending:
    rows: np.ndarray
    future: asyncio.Future
    deadline: float | None  # loop time
    since: float  # loop time of submission


@dataclass
class _Lane:
    max_rows: int
    pending: collections.deque = field(default_factory=collections.deque)


def _others_runnable(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether callbacks other than the running one are due in this event-loop turn (submissions of requests
    that arrived together among them). Read from the loop's ready queue where it has one (asyncio's own
    loops); an unknown loop counts as busy, so its leaders always yield."""
    ready = getattr(loop, "_ready", None)
    return ready is None or len(ready) > 0


class MicroBatcher(Generic[T]):
    def __init__(self, run_batch: Callable[[Hashable, np.ndarray, float | None], Awaitable[T]], *,
                 max_inflight: int = 1, max_wait_s: float = 0.0):
        if max_inflight < 1:
            raise ValueError(f"max_inflight must be >= 1, got {max_inflight}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s}")
        self.run_batch = run_batch
        self.max_inflight = max_inflight
        self.max_wait_s = max_wait_s
        self._lanes: dict[Hashable, _Lane] = {}
        self._inflight = 0
        self._scheduled = False
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task] = set()
        self._after_batch: list[Callable[[], None]] = []  # see after_batch
        #: batches run and their row counts (bounded history; tests and the benchmark read them)
        self.batches = 0
        self.batch_rows: collections.deque[int] = collections.deque(maxlen=10_000)

    # -- submitting -------------------------------------------------------------------------------
    async def submit(self, key: Hashable, rows: np.ndarray, max_rows: int, timeout_s: float | None = None) -> Part[T]:
        """Run ``rows`` (at most ``max_rows``, the lane's batch limit) in a batch with others of ``key``."""
        if len(rows) == 0:
            raise ValueError("nothing to run: empty batch")
        if len(rows) > max_rows:
            raise ValueError(f"{len(rows)} rows are above the batch limit of {max_rows}")
        loop = asyncio.get_running_loop()
        lead = self._inflight < self.max_inflight and not self._lanes and self.max_wait_s == 0
        if lead and not _others_runnable(loop):
            # nothing else can run before this submission's next step: a yield would gather no batch mate, only
            # cost an event-loop turn. Lead a batch of one at once, in the caller's task.
            self._inflight += 1
            return await self._run_alone(key, rows, timeout_s)
        now = loop.time()
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = _Lane(max_rows)
        lane.max_rows = max_rows
        future = loop.create_future()
        pending = _Pending(rows, future, None if timeout_s is None else now + timeout_s, now)
        lane.pending.append(pending)
        if lead:
            self._inflight += 1  # this submission leads the next batch and holds its slot
            try:
                await asyncio.sleep(0)  # submissions already runnable in this loop turn join the lane
            except asyncio.CancelledError:
                future.cancel()
                self._release(loop)
                raise
            if lane.pending and lane.pending[0] is pending:
                batch = self._take(lane)
                if not lane.pending and self._lanes.get(key) is lane:
                    del self._lanes[key]
                if len(batch) == 1:  # alone: run in this task, no hand-off at all
                    return await self._run_alone(key, rows, timeout_s)
                self._launch(key, batch)
            else:  # taken by the dispatcher meanwhile
                self._release(loop)
        else:
            self._kick(loop)
        timer = None if timeout_s is None else loop.call_at(now + timeout_s, self._expire, future, timeout_s)
        try:
            return await future
        except asyncio.CancelledError:
            if not future.cancelled():  # our caller was cancelled: the batch no longer runs its rows
                future.cancel()
            raise
        finally:
            if timer is not None:
                timer.cancel()

    def after_batch(self, callback: Callable[[], None]) -> bool:
        """Call ``callback`` on the event-loop turn after the next batch to finish has handed out its results (so
        the requests it answered have taken their next step by then); False, and no call, when no batch runs."""
        if self._inflight == 0:
            return False
        self._after_batch.append(callback)
        return True

    def _batch_done(self, loop: asyncio.AbstractEventLoop) -> None:
        callbacks, self._after_batch = self._after_batch, []
        for callback in callbacks:
            loop.call_soon(callback)

    async def _run_alone(self, key: Hashable, rows: np.ndarray, timeout_s: float | None) -> Part[T]:
        """A leader that found no batch mate runs in its caller's task (its slot is held already);
        submissions arriving meanwhile pile up for the next batch. The backend honours the deadline."""
        self.batches += 1
        self.batch_rows.append(len(rows))
        loop = asyncio.get_running_loop()
        try:
            result = await self.run_batch(key, rows, timeout_s)
        finally:
            self._release(loop)
            self._batch_done(loop)  # after this task's next step: it continues with its result right away
        return Part(result, 0, len(rows), len(rows))

    def _release(self, loop: asyncio.AbstractEventLoop) -> None:
        self._inflight -= 1
        if self._lanes:
            self._kick(loop)

    @staticmethod
    def _expire(future: asyncio.Future, timeout_s: float) -> None:
        if not future.done():
            future.set_exception(BatchDeadlineExceeded(f"no answer within {timeout_s:.3f}s"))

    # -- dispatching ------------------------------------------------------------------------------
    def _kick(self, loop: asyncio.AbstractEventLoop) -> None:
        """Dispatch on the next loop turn, after every submission already runnable has joined."""
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._dispatch)

    def _dispatch(self) -> None:
        self._scheduled = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        wake_at: float | None = None
        while self._inflight < self.max_inflight:
            ready = []
            for key, lane in self._lanes.items():
                self._drop_abandoned(lane)
                if not lane.pending:
                    continue
                oldest = lane.pending[0].since
                if self.max_wait_s > 0 and sum(len(p.rows) for p in lane.pending) < lane.max_rows \
                        and now < oldest + self.max_wait_s:
                    wake_at = oldest + self.max_wait_s if wake_at is None else min(wake_at, oldest + self.max_wait_s)
                    continue
                ready.append((oldest, key))
            if not ready:
                break
            _, key = min(ready, key=lambda item: item[0])  # the lane waiting longest goes first
            batch = self._take(self._lanes[key])
            if batch:
                self._start(key, batch)
        for key in [k for k, lane in self._lanes.items() if not lane.pending]:
            del self._lanes[key]  # a lane is cheap to re-create; idle ones are not kept
        if wake_at is not None and self._inflight < self.max_inflight:
            self._timer = loop.call_at(wake_at, self._kick, loop)

    @staticmethod
    def _drop_abandoned(lane: _Lane) -> None:
        if any(p.future.done() for p in lane.pending):
            lane.pending = collections.deque(p for p in lane.pending if not p.future.done())

    @staticmethod
    def _take(lane: _Lane) -> list[_Pending]:
        head = lane.pending[0]
        if len(head.rows) > lane.max_rows:  # the lane's limit shrank (a new version) below a waiting submission
            lane.pending.popleft()
            head.future.set_exception(ValueError(f"{len(head.rows)} rows are above the batch limit of {lane.max_rows}"))
            return []
        batch, rows = [], 0
        while lane.pending and rows + len(lane.pending[0].rows) <= lane.max_rows:
            p = lane.pending.popleft()
            batch.append(p)
            rows += len(p.rows)
        return batch

    def _start(self, key: Hashable, batch: list[_Pending]) -> None:
        self._inflight += 1
        self._launch(key, batch)

    def _launch(self, key: Hashable, batch: list[_Pending]) -> None:
        """Run ``batch`` in a task of its own; its slot is already counted."""
        task = asyncio.get_running_loop().create_task(self._run(key, batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, key: Hashable, batch: list[_Pending]) -> None:
        try:
            merged = batch[0].rows if len(batch) == 1 else np.concatenate([p.rows for p in batch])
            deadlines = [p.deadline for p in batch]
            timeout = None if None in deadlines else max(deadlines) - asyncio.get_running_loop().time()
            self.batches += 1
            self.batch_rows.append(len(merged))
            try:
                result = await self.run_batch(key, merged, timeout)
            except Exception as exc:  # every submission of the batch sees the failure
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(exc)
                return
            start = 0
            for p in batch:
                stop = start + len(p.rows)
                if not p.future.done():
                    p.future.set_result(Part(result, start, stop, len(merged)))
                start = stop
        finally:
            loop = asyncio.get_running_loop()
            self._release(loop)
            self._batch_done(loop)  # queued after the wake-ups of the futures set above

__all__ = ["MicroBatcher", "Part", "BatchDeadlineExceeded"]
