"""One query-queue write per micro-batch: the records of requests answered together share one ``put``.

The requests of a micro-batch resume in the same event-loop turn (the batch sets all their results at once),
each builds its answer and hands its chosen records to :meth:`QueueWriter.put`. The first one schedules a
flush on the next loop turn, after every request of the turn has added its records, so one
:meth:`QueryQueue.put` (one SQLite transaction, one fsync; one Redis script call) stores the whole micro-batch.
While a write runs, new records wait and go together in the next one: at most one write per gateway is in
flight, so under load writes grow instead of queueing up (continuous batching, as in the micro-batcher).

``after_batch`` (the gateway passes :meth:`MicroBatcher.after_batch`) lets a flush wait for the model batch
running when it comes due, at most that one: under load the next micro-batch is on the model while this one's
records are ready, and its flagged records then share this write's transaction and fsync instead of paying for
their own. A flag's answer waits at most one model batch longer; with no batch running (every request at low
load) the flush goes at once. What the wait buys: docs/benchmarks.md, "writer: one write per micro-batch".

A ``put`` per request would cost, per flagged request, a thread hand-off, a record count and a transaction
(which the SQLite group commit merges only partly); one per micro-batch costs one of each for the batch.

Durability: every caller gets its record ids only after the ``put`` holding them returned, that is after they
are committed (or spooled and fsync'd); a failed ``put`` raises its error in every caller of it.
"""

from __future__ import annotations

import asyncio
from typing import Callable, Sequence

from .base import NewRecord, QueryQueue


class QueueWriter:
    def __init__(self, queue: QueryQueue, after_batch: Callable[[Callable[[], None]], bool] | None = None):
        self.queue = queue
        self.after_batch = after_batch
        self._waiting: list[tuple[Sequence[NewRecord], asyncio.Future]] = []
        self._busy = False  # a flush is scheduled or running
        #: puts issued and records written (tests and the benchmark read them)
        self.writes = 0
        self.records = 0

    async def put(self, records: Sequence[NewRecord]) -> list[str | None]:
        """Store ``records`` with the others of this loop turn; their ids (None: refused by a full queue)."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._waiting.append((records, future))
        if not self._busy:
            self._busy = True
            loop.call_soon(self._flush)
        return await future

    def _flush(self, deferred: bool = False) -> None:
        if not deferred and self.after_batch is not None and self.after_batch(lambda: self._flush(True)):
            return  # a model batch is running: its records join this write
        batch, self._waiting = self._waiting, []
        asyncio.get_running_loop().create_task(self._write(batch))

    async def _write(self, batch: list[tuple[Sequence[NewRecord], asyncio.Future]]) -> None:
        merged = [r for records, _ in batch for r in records]
        self.writes += 1
        self.records += len(merged)
        try:
            # encoded here, on the loop; only the store's part (transaction, fsync; Redis call) in a thread
            ids = await asyncio.to_thread(self.queue.put_prepared, self.queue.prepare(merged))
        except Exception as exc:  # every caller of this put sees its failure
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
        else:
            start = 0
            for records, future in batch:
                if not future.done():  # a caller that gave up: its records are stored all the same
                    future.set_result(ids[start:start + len(records)])
                start += len(records)
        finally:
            if self._waiting:
                self._flush()
            else:
                self._busy = False


__all__ = ["QueueWriter"]
