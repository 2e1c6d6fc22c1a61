"""QueueWriter: the records of callers of one event-loop turn go in one put (a real SQLite queue), every caller gets
its own ids only once they are committed, a failure reaches every caller of that put, and writes arriving while
one runs go together in the next."""

import asyncio
import threading

import numpy as np
import pytest

from oodguard.queues.base import NewRecord, QueueError
from oodguard.queues.writer import QueueWriter
from oodguard.queues.sqlite import SQLiteQueue


def record(i: int, request_id: str = "") -> NewRecord:
    return NewRecord(model="digits", version=1, input=np.full((1, 4, 4), i, np.float32), logits=np.zeros(3, np.float32),
                     features=np.zeros(2, np.float32), scores={"sisome": float(i)}, decision={"ood": True},
                     flagged=True, request_id=request_id)


class CountingQueue(SQLiteQueue):
    """A real SQLite queue that records every store write's size (and can be made to block or fail)."""

    def __init__(self, path):
        super().__init__(path)
        self.puts: list[int] = []
        self.gate: threading.Event | None = None
        self.fail = False

    def put_prepared(self, prepared):  # what the writer calls (in its thread), after prepare() on the loop
        self.puts.append(len(prepared.rows))
        if self.gate is not None:
            self.gate.wait(10)
        if self.fail:
            raise QueueError("disk full")
        return super().put_prepared(prepared)


@pytest.fixture
def queue(tmp_path):
    q = CountingQueue(tmp_path / "q.sqlite")
    yield q
    q.close()


def test_callers_of_one_loop_turn_share_one_put_and_get_their_own_committed_ids(queue):
    async def main():
        writer = QueueWriter(queue)
        asks = [[record(3 * r + k, f"req-{r}") for k in range(r + 1)] for r in range(5)]
        ids = await asyncio.gather(*(writer.put(a) for a in asks))
        return writer, asks, ids

    writer, asks, ids = asyncio.run(main())
    assert queue.puts == [15] and writer.writes == 1 and writer.records == 15
    for ask, got in zip(asks, ids):
        assert len(got) == len(ask)
        stored = queue.get(got)  # committed before the caller got them
        assert [r.request_id for r in stored] == [a.request_id for a in ask]
        assert [r.scores for r in stored] == [a.scores for a in ask]


def test_writes_arriving_while_one_runs_go_together_in_the_next(queue):
    queue.gate = threading.Event()

    async def main():
        writer = QueueWriter(queue)
        first = asyncio.ensure_future(writer.put([record(0)]))
        while not queue.puts:
            await asyncio.sleep(0.001)  # the first put is running (blocked in its thread)
        later = [asyncio.ensure_future(writer.put([record(i)])) for i in range(1, 4)]
        await asyncio.sleep(0.05)
        assert queue.puts == [1]  # nothing else started while it runs
        queue.gate.set()
        return await first, await asyncio.gather(*later)

    first, later = asyncio.run(main())
    assert queue.puts == [1, 3]
    assert queue.stats().size == 4 and len({*first, *(i for ids in later for i in ids)}) == 4


def test_a_failed_put_fails_every_caller_of_it_and_the_writer_recovers(queue):
    async def main():
        writer = QueueWriter(queue)
        queue.fail = True
        results = await asyncio.gather(writer.put([record(0)]), writer.put([record(1)]), return_exceptions=True)
        queue.fail = False
        return results, await writer.put([record(2)])

    results, after = asyncio.run(main())
    assert all(isinstance(r, QueueError) for r in results)
    assert len(after) == 1 and queue.stats().size == 1


def test_a_full_queue_refuses_per_record_and_each_caller_sees_its_own_refusals(tmp_path):
    q = SQLiteQueue(tmp_path / "q.sqlite", max_size=3)

    async def main():
        writer = QueueWriter(q)
        return await asyncio.gather(writer.put([record(0), record(1)]), writer.put([record(2), record(3)]))

    try:
        a, b = asyncio.run(main())
        assert None not in a and b[0] is not None and b[1] is None
    finally:
        q.close()


def test_a_flush_waits_for_the_model_batch_running_and_its_records_join_the_write(queue):
    """With a real MicroBatcher: the records of batch 1 come due while batch 2 is on the model; the write waits
    for batch 2 (and no longer: batch 3 is not waited for) and stores both batches' records in one put."""
    from oodguard.serve.batching import MicroBatcher

    release = {}

    async def run_batch(key, rows, timeout_s):
        release[key] = asyncio.get_running_loop().create_future()
        await release[key]
        return len(rows)

    async def main():
        batcher = MicroBatcher(run_batch)
        writer = QueueWriter(queue, batcher.after_batch)

        async def request(key):
            await batcher.submit(key, np.zeros((1, 1)), 8)
            return await writer.put([record(key, f"req-{key}")])

        first = asyncio.create_task(request(1))
        await asyncio.sleep(0)
        second = asyncio.create_task(request(2))  # waits for batch 1 to free the model
        await asyncio.sleep(0)
        release[1].set_result(None)  # batch 1 answers; batch 2 starts; batch 1's record comes due
        for _ in range(5):
            await asyncio.sleep(0)
        assert writer.writes == 0 and writer._waiting and not first.done()  # its write waits for batch 2
        third = asyncio.create_task(request(3))
        await asyncio.sleep(0)
        release[2].set_result(None)  # batch 2 answers: the write goes with both records, batch 3 runs
        ids = await asyncio.gather(first, second)
        assert queue.puts == [2] and writer.writes == 1
        release[3].set_result(None)
        await third
        assert queue.puts == [2, 1]  # batch 3's record: nothing was running when it came due
        return ids

    ids = asyncio.run(main())
    assert [r.request_id for r in queue.get([i for got in ids for i in got])] == ["req-1", "req-2"]


def test_without_a_batch_running_a_flush_goes_at_once(queue):
    from oodguard.serve.batching import MicroBatcher

    async def main():
        batcher = MicroBatcher(lambda key, rows, timeout_s: asyncio.sleep(0, len(rows)))
        writer = QueueWriter(queue, batcher.after_batch)
        await batcher.submit("m", np.zeros((1, 1)), 8)
        return await writer.put([record(1)])

    assert len(asyncio.run(main())) == 1 and queue.puts == [1]
