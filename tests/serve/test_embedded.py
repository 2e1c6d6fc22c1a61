import asyncio
import os
import shutil
import threading
import time

import numpy as np
import pytest

from oodguard.onnx_runner import OnnxModel
from oodguard.serve.backend import BackendUnavailable, DeadlineExceeded, ModelNotFound
from oodguard.serve.embedded import EmbeddedBackend


def inputs(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 1, 28, 28)).astype(np.float32)


async def started(repository, **kwargs) -> EmbeddedBackend:
    backend = EmbeddedBackend(repository, **kwargs)
    await backend.start()
    return backend


def test_outputs_equal_a_direct_session(digits_export):
    repository = digits_export[2]
    x = inputs(10)
    direct = OnnxModel(repository / "digits" / "1" / "model.onnx").run(x)

    async def main():
        backend = await started(repository)
        try:
            assert await backend.ready_versions() == {"digits": [1]}
            return await backend.infer("digits", None, x, timeout_s=10)
        finally:
            await backend.close()

    result = asyncio.run(main())
    assert (result.model, result.version) == ("digits", 1)
    assert set(result.outputs) == set(direct)
    for name, value in direct.items():
        np.testing.assert_allclose(result.outputs[name], value, rtol=1e-5, atol=1e-5)
        assert result.outputs[name].shape == value.shape


def test_an_input_above_the_max_batch_size_runs_in_chunks(digits_export):
    repository = digits_export[2]
    x = inputs(130)  # the digits model declares max_batch_size 64: 64 + 64 + 2
    direct = OnnxModel(repository / "digits" / "1" / "model.onnx").run(x)

    async def main():
        backend = await started(repository)
        try:
            before = backend.executions
            result = await backend.infer("digits", 1, x, 10)
            return result, backend.executions - before
        finally:
            await backend.close()

    result, executions = asyncio.run(main())
    assert executions == 3
    assert result.outputs["features"].shape == (130, 84)
    np.testing.assert_allclose(result.outputs["sisome"], direct["sisome"], rtol=1e-4, atol=1e-4)


def test_new_version_copied_in_is_served_after_a_poll(repo_copy):
    async def main():
        backend = await started(repo_copy, poll_interval_s=0.1)
        try:
            assert (await backend.infer("digits", None, inputs(1), 10)).version == 1
            staging = repo_copy / "digits" / ".incoming-2"
            shutil.copytree(repo_copy / "digits" / "1", staging)
            os.rename(staging, repo_copy / "digits" / "2")  # atomic publish
            deadline = time.monotonic() + 10
            while (await backend.ready_versions())["digits"] != [1, 2]:
                assert time.monotonic() < deadline, "version 2 never became ready"
                await asyncio.sleep(0.05)
            latest = await backend.infer("digits", None, inputs(2), 10)
            old = await backend.infer("digits", 1, inputs(2), 10)
            # a broken version is not served and does not disturb the others
            (repo_copy / "digits" / "3").mkdir()
            (repo_copy / "digits" / "3" / "model.onnx").write_bytes(b"not onnx")
            await backend.refresh()
            ready = await backend.ready_versions()
            shutil.rmtree(repo_copy / "digits" / "1")
            await backend.refresh()
            return latest, old, ready, await backend.ready_versions()
        finally:
            await backend.close()

    latest, old, ready, after_removal = asyncio.run(main())
    assert latest.version == 2 and old.version == 1
    np.testing.assert_allclose(latest.outputs["logits"], old.outputs["logits"], rtol=1e-5, atol=1e-5)
    assert ready == {"digits": [1, 2]}
    assert after_removal == {"digits": [2]}


def test_unknown_model_version_and_deadline(digits_export):
    async def main():
        backend = await started(digits_export[2])
        gate = threading.Event()
        try:
            with pytest.raises(ModelNotFound, match="'nope'"):
                await backend.infer("nope", None, inputs(1), 1)
            with pytest.raises(ModelNotFound, match="version 7"):
                await backend.infer("digits", 7, inputs(1), 1)
            with pytest.raises(DeadlineExceeded, match="deadline passed"):
                await backend.infer("digits", 1, inputs(1), 0)
            backend._executor.submit(gate.wait, 10)  # the only worker is busy: a new run has to wait for it
            t0 = time.monotonic()
            with pytest.raises(DeadlineExceeded, match="within 0.050s"):
                await backend.infer("digits", 1, inputs(2), 0.05)  # two rows: never run inline
            waited = time.monotonic() - t0
            # a single row of this small model runs on the event loop: the busy worker does not delay it
            t0 = time.monotonic()
            assert (await backend.infer("digits", 1, inputs(1), 0.05)).outputs["logits"].shape == (1, 8)
            assert time.monotonic() - t0 < 0.05
            gate.set()
            # the server keeps answering afterwards
            return waited, (await backend.infer("digits", 1, inputs(1), 5)).outputs["logits"].shape
        finally:
            gate.set()
            await backend.close()

    waited, shape = asyncio.run(main())
    assert 0.04 < waited < 0.5 and shape == (1, 8)


def test_close_waits_for_a_running_batch_and_refuses_new_ones(digits_export):
    async def main():
        backend = await started(digits_export[2])
        running = asyncio.create_task(backend.infer("digits", 1, inputs(64), 10))
        await asyncio.sleep(0)
        await backend.close()
        result = await running
        with pytest.raises(BackendUnavailable, match="closed"):
            await backend.infer("digits", 1, inputs(1), 1)
        return result

    assert asyncio.run(main()).outputs["logits"].shape == (64, 8)


def test_a_small_model_gets_one_thread_and_runs_single_rows_inline(digits_export):
    from oodguard.serve.embedded import INLINE_BUDGET_S

    async def main(threads):
        backend = await started(digits_export[2], intra_op_threads=threads)
        try:
            entry = backend._versions[("digits", 1)]
            return entry.onnx.session.get_session_options().intra_op_num_threads, entry.single_row_s
        finally:
            await backend.close()

    threads, single_row_s = asyncio.run(main(0))  # auto
    assert threads == 1 and 0 < single_row_s < INLINE_BUDGET_S
    assert asyncio.run(main(2))[0] == 2  # an explicit count is kept


def test_single_row_time_is_the_fastest_run_within_a_time_budget(monkeypatch):
    # a busy moment (one slow run) must not make a small model look big; a big model is not run for long.
    # The runs advance a virtual clock, so the test does not depend on this machine's load.
    from types import SimpleNamespace

    from oodguard.serve import embedded

    now = [0.0]
    monkeypatch.setattr(embedded.time, "perf_counter", lambda: now[0])

    def model(delays):
        delays = iter(delays)
        calls = []

        def run(outputs, feed):
            calls.append(feed["input"].shape)
            now[0] += next(delays)
        return SimpleNamespace(input_shape=(1, 2, 2), session=SimpleNamespace(run=run)), calls

    small, calls = model([0.0, 0.02, 0.001, 0.02] + [0.004] * 30)
    assert embedded._single_row_seconds(small, runs=10) == pytest.approx(0.001)
    assert len(calls) == 11 and calls[0] == (1, 1, 2, 2)  # a first (allocating) run, then 10 timed ones
    big, calls = model([0.0] + [0.03] * 30)
    assert embedded._single_row_seconds(big, runs=20, budget_s=0.05) == pytest.approx(0.03)
    assert len(calls) == 4  # runs started at 0, 0.03, 0.06 s: the one started past the 0.05 s budget is the last


def test_single_rows_go_to_the_worker_when_inlining_is_not_allowed(digits_export):
    # the gateway forbids inlining while other requests are in flight, so the loop stays free to merge them
    async def main():
        backend = await started(digits_export[2])
        gate = threading.Event()
        try:
            backend.inline_allowed = lambda: False
            backend._executor.submit(gate.wait, 10)  # the worker is busy: a row sent to it must wait
            with pytest.raises(DeadlineExceeded):
                await backend.infer("digits", 1, inputs(1), 0.05)
            gate.set()
            return (await backend.infer("digits", 1, inputs(1), 5)).outputs["logits"].shape
        finally:
            gate.set()
            await backend.close()

    assert asyncio.run(main()) == (1, 8)
