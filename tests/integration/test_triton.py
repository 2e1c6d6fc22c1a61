"""A real tritonserver (CPU, python backend running model.py → ONNX Runtime) serving the exported digits model.

The server (tests/integration/conftest.py) is shared by this module and restarted by the outage test; the
hot-reload test adds version 2 and so runs last.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import time

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from oodguard.repository import MODEL_FILE, version_dir
from oodguard.serve.backend import BackendError, BackendUnavailable, DeadlineExceeded, ModelNotFound
from oodguard.serve.triton_backend import TritonBackend

MODEL = "digits"


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 1, 28, 28)).astype(np.float32)


def onnx_reference(repository, version: int, batch: np.ndarray) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(version_dir(repository, MODEL, version) / MODEL_FILE),
                                   providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, {"input": batch})))


def infer_direct(url: str, batch: np.ndarray, version: str = "") -> grpcclient.InferResult:
    client = grpcclient.InferenceServerClient(url)
    try:
        tensor = grpcclient.InferInput("input", list(batch.shape), "FP32")
        tensor.set_data_from_numpy(batch)
        return client.infer(MODEL, [tensor], model_version=version, client_timeout=10)
    finally:
        client.close()


def test_tritonclient_returns_batch_by_1_scores_equal_to_onnx_runtime(triton_server):
    batch = images(5)
    result = infer_direct(triton_server.url, batch)
    want = onnx_reference(triton_server.repository, 1, batch)
    assert result.get_response().model_version == "1"
    assert {o.name for o in result.get_response().outputs} == set(want)
    for name, array in want.items():
        got = result.as_numpy(name)
        if array.ndim == 1:  # a [B] score, declared dims: [1] reshape: { shape: [ ] }
            assert got.shape == (5, 1), name
            got = got[:, 0]
        assert got.shape == array.shape and got.dtype == np.float32, name
        np.testing.assert_allclose(got, array, rtol=1e-5, atol=1e-5, err_msg=name)
    # the python backend imported model.py: its bytecode went outside the repository
    served = sorted(p.name for p in version_dir(triton_server.repository, MODEL, 1).iterdir())
    assert served == ["calibration.json", "model.onnx", "model.py"]


def test_backend_infer_squeezes_scores_and_reports_the_version(triton_server):
    batch = images(7, seed=1)
    want = onnx_reference(triton_server.repository, 1, batch)

    async def run():
        backend = TritonBackend(triton_server.url, triton_server.repository)
        await backend.start()
        try:
            latest = await backend.infer(MODEL, None, batch, timeout_s=10)
            pinned = await backend.infer(MODEL, 1, batch[:1], timeout_s=10)
            return latest, pinned, await backend.ready_versions()
        finally:
            await backend.close()

    latest, pinned, ready = asyncio.run(run())
    assert ready == {MODEL: [1]}
    assert latest.model == MODEL and latest.version == 1 and pinned.version == 1
    assert set(latest.outputs) == set(want)
    for name, array in want.items():
        assert latest.outputs[name].shape == array.shape and latest.outputs[name].dtype == np.float32, name
        np.testing.assert_allclose(latest.outputs[name], array, rtol=1e-5, atol=1e-5, err_msg=name)
        np.testing.assert_allclose(pinned.outputs[name], array[:1], rtol=1e-5, atol=1e-5, err_msg=name)


def test_bad_requests_get_errors_and_the_server_keeps_serving(triton_server):
    with pytest.raises(InferenceServerException) as wrong_shape:
        infer_direct(triton_server.url, np.zeros((2, 5), np.float32))
    assert wrong_shape.value.status() == "StatusCode.INVALID_ARGUMENT"
    with pytest.raises(InferenceServerException):
        infer_direct(triton_server.url, images(65))  # over max_batch_size
    assert infer_direct(triton_server.url, images(1)).as_numpy("msp").shape == (1, 1)

    async def run():
        backend = TritonBackend(triton_server.url, triton_server.repository)
        try:
            errors = []
            for model, version, batch in ((MODEL, None, np.zeros((2, 1, 5, 5), np.float32)),
                                          (MODEL, 9, images(1)), ("absent", None, images(1))):
                with pytest.raises(BackendError) as caught:
                    await backend.infer(model, version, batch, timeout_s=10)
                errors.append(caught.value)
            with pytest.raises(DeadlineExceeded):
                await backend.infer(MODEL, None, images(64), timeout_s=1e-4)
            return errors, await backend.infer(MODEL, None, images(2), timeout_s=10)
        finally:
            await backend.close()

    (shape, version, model), good = asyncio.run(run())
    assert type(shape) is BackendError and "INVALID_ARGUMENT" in str(shape)
    assert isinstance(version, ModelNotFound) and isinstance(model, ModelNotFound)
    assert good.outputs["msp"].shape == (2,)
    assert triton_server.process.poll() is None


async def _until_infer_works(backend: TritonBackend, limit_s: float) -> float:
    began = time.monotonic()
    while True:
        try:
            await backend.infer(MODEL, None, images(1), timeout_s=2)
            return time.monotonic() - began
        except BackendUnavailable:
            if time.monotonic() - began > limit_s:
                raise
            await asyncio.sleep(0.05)


def test_outage_is_backend_unavailable_and_the_same_backend_recovers(triton_server):
    async def run():
        backend = TritonBackend(triton_server.url, triton_server.repository)
        await backend.start()
        try:
            await backend.infer(MODEL, None, images(1), timeout_s=10)

            # Abrupt crash: SIGKILL.
            triton_server.kill()
            with pytest.raises(BackendUnavailable) as down:
                await backend.infer(MODEL, None, images(1), timeout_s=5)
            with pytest.raises(BackendUnavailable):
                await backend.ready_versions()
            triton_server.start()
            after_kill = await _until_infer_works(backend, limit_s=10)
            assert await backend.ready_versions() == {MODEL: [1]}

            # Orderly stop: SIGTERM. While it drains and unloads, every failure is "unavailable", never
            # "model not found" (Triton answers NOT_FOUND once the model is unloaded).
            os.killpg(triton_server.process.pid, signal.SIGTERM)
            seen = set()
            while triton_server.process.poll() is None:
                try:
                    await backend.infer(MODEL, None, images(1), timeout_s=5)
                except BackendUnavailable as exc:
                    seen.add(str(exc).split(": ", 2)[1][:40] if ": " in str(exc) else str(exc))
                await asyncio.sleep(0.02)
            with pytest.raises(BackendUnavailable):
                await backend.infer(MODEL, None, images(1), timeout_s=5)
            triton_server.stop()
            triton_server.start()
            after_term = await _until_infer_works(backend, limit_s=10)
            return str(down.value), after_kill, after_term, seen
        finally:
            await backend.close()

    down, after_kill, after_term, seen = asyncio.run(run())
    assert "UNAVAILABLE" in down
    assert seen, "no request failed while the server was stopping"
    print(f"recovered {after_kill:.2f} s after SIGKILL+restart, {after_term:.2f} s after SIGTERM+restart; "
          f"while stopping: {sorted(seen)}")


def test_hot_reload_serves_a_version_moved_in_atomically(triton_server):
    repository = triton_server.repository
    staging = repository / MODEL / ".staging-2"
    shutil.copytree(version_dir(repository, MODEL, 1), staging)  # same filesystem as the final folder

    async def run():
        backend = TritonBackend(triton_server.url, repository)
        try:
            assert await backend.ready_versions() == {MODEL: [1]}
            os.rename(staging, version_dir(repository, MODEL, 2))
            began = time.monotonic()
            while 2 not in (await backend.ready_versions()).get(MODEL, []):
                assert time.monotonic() - began < 5, triton_server.log_tail()
                await asyncio.sleep(0.05)
            ready_after = time.monotonic() - began
            latest = await backend.infer(MODEL, None, images(3), timeout_s=10)
            # version_policy latest 2: version 1 stays served beside 2 (a client pinned to it keeps working) ...
            assert (await backend.ready_versions()) == {MODEL: [1, 2]}
            assert (await backend.infer(MODEL, 1, images(1), timeout_s=10)).version == 1
            # ... until a third arrives: then 1 unloads
            shutil.copytree(version_dir(repository, MODEL, 1), staging)
            os.rename(staging, version_dir(repository, MODEL, 3))
            while (await backend.ready_versions()) != {MODEL: [2, 3]}:
                assert time.monotonic() - began < 15, triton_server.log_tail()
                await asyncio.sleep(0.05)
            with pytest.raises(ModelNotFound):
                await backend.infer(MODEL, 1, images(1), timeout_s=10)
            return ready_after, latest
        finally:
            await backend.close()

    ready_after, latest = asyncio.run(run())
    assert latest.version == 2 and latest.outputs["sisom"].shape == (3,)
    loads = triton_server.log_tail(10**7).count('"loading: digits:')
    time.sleep(2.5)  # two more polls: model.py's bytecode (written outside the repository) triggers no reload
    assert triton_server.log_tail(10**7).count('"loading: digits:') == loads
    assert triton_server.log_tail(10**7).count('"loading: digits:3"') == 1
    print(f"version 2 ready {ready_after:.2f} s after the rename")
