"""MicroBatcher on its own, with a recording run function (the gateway tests drive it with real backends)."""

import asyncio
import time

import numpy as np
import pytest

from oodguard.serve.batching import BatchDeadlineExceeded, MicroBatcher


class Recorder:
    """A run function that records every batch and can be held closed by a gate."""

    def __init__(self, fail_first: int = 0):
        self.batches: list[tuple[object, list[float]]] = []
        self.gate: asyncio.Event | None = None
        self.running = 0
        self.most_running = 0
        self.fail_first = fail_first

    async def __call__(self, key, rows, timeout_s):
        self.batches.append((key, rows[:, 0].tolist()))
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            await asyncio.sleep(0.001)  # a backend call takes time: submissions meanwhile must wait
            if self.gate is not None:
                await self.gate.wait()
            if len(self.batches) <= self.fail_first:
                raise RuntimeError("backend down")
            return {"key": key, "doubled": rows * 2, "timeout": timeout_s}
        finally:
            self.running -= 1


def rows(*values) -> np.ndarray:
    return np.array(values, dtype=np.float32).reshape(-1, 1)


def test_submissions_of_one_loop_turn_share_one_batch_and_get_their_own_rows():
    run = Recorder()

    async def main():
        batcher = MicroBatcher(run)
        return await asyncio.gather(*(batcher.submit("m", rows(i, i + 0.5), 64) for i in range(5)))

    parts = asyncio.run(main())
    # the first found the batcher idle and led the batch; the other four joined it in the same loop turn
    assert run.batches == [("m", [0, 0.5, 1, 1.5, 2, 2.5, 3, 3.5, 4, 4.5])]
    for i, part in enumerate(parts):
        assert (part.start, part.stop, part.batch_rows) == (2 * i, 2 * i + 2, 10)
        assert part.result["doubled"][part.start:part.stop, 0].tolist() == [2 * i, 2 * i + 1]
        assert part.result["timeout"] is None


def test_a_lone_leader_runs_in_its_own_task():
    run = Recorder()

    async def main():
        batcher = MicroBatcher(run)
        me = asyncio.current_task()
        seen = []

        async def record(key, rows, timeout_s):
            seen.append(asyncio.current_task() is me)
            return await run(key, rows, timeout_s)

        batcher.run_batch = record
        part = await batcher.submit("m", rows(7), 64, timeout_s=5.0)
        return part, seen, batcher._inflight, batcher._lanes

    part, seen, inflight, lanes = asyncio.run(main())
    assert seen == [True] and (part.start, part.stop) == (0, 1) and part.result["timeout"] == 5.0
    assert inflight == 0 and lanes == {}


def test_a_lone_submission_with_nothing_else_due_runs_at_once_without_an_event_loop_turn():
    """Low load: a submission alone in its loop turn cannot gain a batch mate by yielding, so it runs at once.
    Driven by hand: the first step of the coroutine already ends with the answer (no yield to the loop)."""
    async def run(key, rows, timeout_s):  # a backend that answers without suspending (as the inline ORT run)
        return {"rows": rows.tolist()}

    async def main():
        batcher = MicroBatcher(run)
        loop = asyncio.get_running_loop()
        assert not loop._ready  # nothing else due in this turn
        coroutine = batcher.submit("m", rows(3), 64)
        with pytest.raises(StopIteration) as done:
            coroutine.send(None)
        return done.value.value, batcher

    part, batcher = asyncio.run(main())
    assert part.result == {"rows": [[3.0]]} and (part.start, part.stop, part.batch_rows) == (0, 1, 1)
    assert batcher.batches == 1 and list(batcher.batch_rows) == [1] and batcher._inflight == 0 and not batcher._lanes


def test_a_leader_yields_when_other_callbacks_are_due_and_their_submissions_join_it():
    """A request that arrives with others (their callbacks due in the same loop turn) waits one turn for them."""
    run = Recorder()

    async def main():
        batcher = MicroBatcher(run)
        # due in this turn, before the leader's submission goes on: the next request of a burst
        later = asyncio.ensure_future(batcher.submit("m", rows(2), 64))
        assert asyncio.get_running_loop()._ready
        first = await batcher.submit("m", rows(1), 64)
        return first, await later

    first, second = asyncio.run(main())
    assert run.batches == [("m", [1.0, 2.0])]  # one batch for both
    assert (first.start, first.stop, second.start, second.stop, first.batch_rows) == (0, 1, 1, 2, 2)


def test_while_the_slot_is_busy_requests_pile_up_into_the_next_batch():
    run = Recorder()

    async def main():
        batcher = MicroBatcher(run)
        run.gate = asyncio.Event()
        first = asyncio.create_task(batcher.submit("m", rows(0), 64))
        await asyncio.sleep(0.01)  # the first batch is running, held by the gate
        rest = [asyncio.create_task(batcher.submit("m", rows(i), 64)) for i in range(1, 11)]
        await asyncio.sleep(0.01)
        assert len(run.batches) == 1  # nothing else started: the only slot is busy
        run.gate.set()
        await asyncio.gather(first, *rest)
        return list(batcher.batch_rows), batcher.batches

    sizes, count = asyncio.run(main())
    assert run.batches == [("m", [0]), ("m", [float(i) for i in range(1, 11)])]
    assert sizes == [1, 10] and count == 2


def test_batches_respect_the_row_limit_and_keys_are_never_mixed():
    run = Recorder()

    async def main():
        batcher = MicroBatcher(run, max_inflight=2)
        work = [batcher.submit("a", rows(i, i), 4) for i in range(5)] + [batcher.submit("b", rows(100 + i), 4) for i in range(3)]
        return await asyncio.gather(*work)

    parts = asyncio.run(main())
    assert all(len(values) <= 4 for _, values in run.batches)
    assert sorted(v for key, values in run.batches if key == "a" for v in values) == sorted([float(i) for i in range(5)] * 2)
    assert [values for key, values in run.batches if key == "b"] == [[100, 101, 102]]  # one batch: under the limit
    for i, part in enumerate(parts[:5]):
        assert part.result["key"] == "a" and part.result["doubled"][part.start:part.stop, 0].tolist() == [2 * i, 2 * i]


def test_max_inflight_batches_run_at_the_same_time():
    run = Recorder()

    async def main():
        batcher = MicroBatcher(run, max_inflight=3)
        run.gate = asyncio.Event()
        tasks = [asyncio.create_task(batcher.submit("m", rows(i), 1)) for i in range(6)]
        await asyncio.sleep(0.01)
        started = len(run.batches)
        run.gate.set()
        await asyncio.gather(*tasks)
        return started

    assert asyncio.run(main()) == 3
    assert run.most_running == 3 and len(run.batches) == 6


def test_a_lone_request_does_not_wait_unless_a_window_is_set():
    def lone(max_wait_s):
        async def main():
            batcher = MicroBatcher(Recorder(), max_wait_s=max_wait_s)
            await batcher.submit("m", rows(1), 64)  # warm-up
            t0 = time.monotonic()
            await batcher.submit("m", rows(1), 64)
            return time.monotonic() - t0
        return asyncio.run(main())

    assert lone(0.0) < 0.05
    assert 0.19 < lone(0.2) < 1.0


def test_a_window_gathers_requests_that_arrive_within_it():
    run = Recorder()

    async def main():
        batcher = MicroBatcher(run, max_wait_s=0.2)
        tasks = []
        for i in range(4):
            tasks.append(asyncio.create_task(batcher.submit("m", rows(i), 64)))
            await asyncio.sleep(0.02)
        await asyncio.gather(*tasks)

    asyncio.run(main())
    assert run.batches == [("m", [0, 1, 2, 3])]


def test_a_full_batch_does_not_wait_for_the_window():
    run = Recorder()

    async def main():
        batcher = MicroBatcher(run, max_wait_s=5.0)
        t0 = time.monotonic()
        await asyncio.gather(*(batcher.submit("m", rows(i), 4) for i in range(4)))
        return time.monotonic() - t0

    assert asyncio.run(main()) < 1.0 and run.batches == [("m", [0, 1, 2, 3])]


def test_a_failure_reaches_every_request_of_its_batch_only():
    run = Recorder(fail_first=1)

    async def main():
        batcher = MicroBatcher(run)
        failed = await asyncio.gather(*(batcher.submit("m", rows(i), 64) for i in range(3)), return_exceptions=True)
        ok = await batcher.submit("m", rows(9), 64)
        return failed, ok

    failed, ok = asyncio.run(main())
    assert run.batches == [("m", [0, 1, 2]), ("m", [9])]
    assert [str(e) for e in failed] == ["backend down"] * 3
    assert ok.result["doubled"][ok.start, 0] == 18


def test_a_request_past_its_deadline_is_dropped_before_its_batch_runs():
    run = Recorder()

    async def main():
        batcher = MicroBatcher(run)
        run.gate = asyncio.Event()
        first = asyncio.create_task(batcher.submit("m", rows(0), 64))
        await asyncio.sleep(0.01)
        late = asyncio.create_task(batcher.submit("m", rows(1), 64, timeout_s=0.05))
        patient = asyncio.create_task(batcher.submit("m", rows(2), 64, timeout_s=5.0))
        with pytest.raises(BatchDeadlineExceeded, match="within 0.050s"):
            await late
        run.gate.set()
        await first
        return await patient

    part = asyncio.run(main())
    assert run.batches == [("m", [0]), ("m", [2])]  # the late request never reached the backend
    assert 0 < part.result["timeout"] <= 5.0  # the batch's deadline is passed on


@pytest.mark.parametrize("values, limit, message", [((), 4, "empty batch"), ((1, 2, 3), 2, "above the batch limit of 2")])
def test_invalid_submissions_are_refused(values, limit, message):
    async def main():
        await MicroBatcher(Recorder()).submit("m", rows(*values), limit)

    with pytest.raises(ValueError, match=message):
        asyncio.run(main())


@pytest.mark.parametrize("kwargs, message", [(dict(max_inflight=0), "max_inflight"), (dict(max_wait_s=-1), "max_wait_s")])
def test_invalid_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MicroBatcher(Recorder(), **kwargs)


def test_after_batch_calls_back_once_after_the_running_batch_answered_and_its_callers_stepped():
    import asyncio

    import numpy as np

    from oodguard.serve.batching import MicroBatcher

    events = []

    async def main():
        gate = asyncio.get_running_loop().create_future()

        async def run_batch(key, rows, timeout_s):
            await gate
            return len(rows)

        batcher = MicroBatcher(run_batch)
        assert batcher.after_batch(lambda: events.append("idle")) is False  # nothing running: no call

        async def caller(i):
            await batcher.submit("m", np.zeros((1, 1)), 8)
            events.append(f"caller {i}")

        tasks = [asyncio.create_task(caller(i)) for i in range(3)]
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert batcher.after_batch(lambda: events.append("after")) is True
        gate.set_result(None)
        await asyncio.gather(*tasks)
        for _ in range(3):
            await asyncio.sleep(0)

    asyncio.run(main())
    assert events.count("after") == 1 and "idle" not in events
    assert events.index("after") > max(events.index(f"caller {i}") for i in range(3))
