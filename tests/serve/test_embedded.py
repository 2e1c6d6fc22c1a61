import asyncio
import os
import shutil
import time

import numpy as np
import pytest

from oodguard.onnx_runner import OnnxModel
from oodguard.serve.backend import DeadlineExceeded, ModelNotFound
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


def test_concurrent_requests_are_merged_into_batches(digits_export):
    repository = digits_export[2]
    direct = OnnxModel(repository / "digits" / "1" / "model.onnx")
    xs = [inputs(1 + i % 3, seed=i) for i in range(24)]  # 48 rows

    async def main():
        backend = await started(repository, max_wait_ms=50)
        try:
            results = await asyncio.gather(*(backend.infer("digits", 1, x, 10) for x in xs))
            return results, backend.executions, list(backend.batch_sizes)
        finally:
            await backend.close()

    results, executions, sizes = asyncio.run(main())
    assert sum(sizes) == 48
    assert executions < 24 and max(sizes) > 3, (executions, sizes)
    for x, result in zip(xs, results):
        expected = direct.run(x)
        assert result.outputs["logits"].shape == (len(x), 8)
        np.testing.assert_allclose(result.outputs["sisome"], expected["sisome"], rtol=1e-4, atol=1e-4)


def test_batches_never_exceed_max_batch(digits_export):
    async def main():
        backend = await started(digits_export[2], max_wait_ms=30, max_batch=4)
        try:
            await asyncio.gather(*(backend.infer("digits", 1, inputs(1 + i % 2, i), 10) for i in range(10)))
            big = await backend.infer("digits", 1, inputs(9), 10)  # above max_batch: chunked
            return list(backend.batch_sizes), big
        finally:
            await backend.close()

    sizes, big = asyncio.run(main())
    assert max(sizes) <= 4 and sum(sizes) == 15 + 9 and len(sizes) >= 4 + 3
    assert big.outputs["features"].shape == (9, 84)


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
        backend = await started(digits_export[2], max_wait_ms=300)
        try:
            with pytest.raises(ModelNotFound, match="'nope'"):
                await backend.infer("nope", None, inputs(1), 1)
            with pytest.raises(ModelNotFound, match="version 7"):
                await backend.infer("digits", 7, inputs(1), 1)
            t0 = time.monotonic()
            await backend._run_slots.acquire()  # the only worker is busy: a new request waits for batch mates
            try:
                with pytest.raises(DeadlineExceeded):
                    await backend.infer("digits", 1, inputs(1), 0.05)  # the window is 300 ms
            finally:
                backend._run_slots.release()
            assert time.monotonic() - t0 < 0.25
            # the server keeps answering afterwards
            return (await backend.infer("digits", 1, inputs(1), 5)).outputs["logits"].shape
        finally:
            await backend.close()

    assert asyncio.run(main()) == (1, 8)


def test_a_lone_request_does_not_wait_for_the_batching_window(digits_export):
    async def main():
        backend = await started(digits_export[2], max_wait_ms=500)
        try:
            await backend.infer("digits", 1, inputs(1), 5)  # warm-up
            t0 = time.monotonic()
            await backend.infer("digits", 1, inputs(1), 5)
            return time.monotonic() - t0
        finally:
            await backend.close()

    assert asyncio.run(main()) < 0.25  # far below the 500 ms window: an idle worker dispatches at once
