"""The embedded backend: ONNX Runtime in-process over the model repository.

Every version folder holding a ``model.onnx`` gets a session (a folder whose model cannot be loaded is
retried when its file changes). :meth:`EmbeddedBackend.infer` runs a batch in one of ``workers``
threads, so the event loop keeps serving gRPC while ONNX Runtime computes; an input larger than the
version's ``max_batch_size`` runs in chunks. A single row of a model whose single-row runs (measured at
load, then by every single-row run in a worker) take less than ``INLINE_BUDGET_S`` runs on the event
loop instead: at low load that saves two thread hand-offs, more than such a run costs. With
``intra_op_threads = 0`` such a small model gets a one-thread session (see ``_load_session``). Merging
concurrent requests into batches is the gateway's job (:mod:`oodguard.serve.batching`), the same for every
backend; ``max_inflight_batches`` tells it how many batches to run at once (one per worker). The repository is
polled every ``poll_interval_s`` for new and removed versions.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from oodguard import repository as repo
from oodguard.onnx_runner import OnnxModel

from .backend import Backend, BackendUnavailable, DeadlineExceeded, InferenceResult, ModelNotFound

log = logging.getLogger("oodguard.serve.embedded")

DEFAULT_MAX_BATCH = 64
#: a single-row run expected to take less than this runs on the event loop itself: for a small model the
#: two thread hand-offs (to a worker and back) cost more than the run and add latency at low load
INLINE_BUDGET_S = 0.0005


@dataclass
class _Version:
    model: str
    version: int
    onnx: OnnxModel
    max_batch: int
    stamp: tuple
    single_row_s: float  # running estimate of one single-row run (measured at load, updated by worker runs)


def _stamp(path: Path) -> tuple:
    st = path.stat()
    return (st.st_mtime_ns, st.st_size)


def _declared_max_batch(folder: Path) -> int:
    """``max_batch_size`` from the version's calibration.json (the backend only reads that one field)."""
    try:
        raw = json.loads((folder / repo.CALIBRATION_FILE).read_text())
        value = int(raw["model"]["max_batch_size"])
        return value if value > 0 else DEFAULT_MAX_BATCH
    except (OSError, ValueError, KeyError, TypeError):
        return DEFAULT_MAX_BATCH


def _single_row_seconds(onnx: OnnxModel, runs: int = 20, budget_s: float = 0.1) -> float:
    """The fastest of up to ``runs`` single-row runs on zeros (at most ``budget_s`` spent after the first
    run). The minimum, not a mean: load on a shared machine only ever adds time, and the figure decides
    whether a model is small enough to run on the event loop, which must not depend on a busy moment."""
    row = np.zeros((1, *onnx.input_shape), np.float32)
    onnx.session.run(None, {repo.INPUT_NAME: row})  # the first run allocates
    fastest, began = float("inf"), time.perf_counter()
    for _ in range(runs):
        started = time.perf_counter()
        onnx.session.run(None, {repo.INPUT_NAME: row})
        fastest = min(fastest, time.perf_counter() - started)
        if started - began > budget_s:
            break
    return fastest


class EmbeddedBackend(Backend):
    def __init__(self, repository: str | Path, poll_interval_s: float = 5.0, intra_op_threads: int = 0,
                 workers: int = 1):
        self.repository = Path(repository)
        self.poll_interval_s = poll_interval_s
        self.intra_op_threads = intra_op_threads
        self._executor = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="oodguard-ort")
        self.max_inflight_batches = max(1, workers)
        self._running = 0
        self._versions: dict[tuple[str, int], _Version] = {}
        self._failed: dict[tuple[str, int], tuple] = {}  # version → stamp of the model that failed to load
        self._poller: asyncio.Task | None = None
        self._refresh_lock: asyncio.Lock | None = None
        self._closed = False
        #: number of ONNX Runtime executions (tests read it)
        self.executions = 0

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        self._refresh_lock = asyncio.Lock()
        await self.refresh()
        self._poller = asyncio.create_task(self._poll_loop(), name="oodguard-embedded-poll")

    async def close(self) -> None:
        """Stop polling and wait (up to 10 s) for running batches; later calls raise BackendUnavailable."""
        self._closed = True
        if self._poller:
            self._poller.cancel()
        loop = asyncio.get_running_loop()
        end = loop.time() + 10
        while self._running and loop.time() < end:
            await asyncio.sleep(0.01)
        self._versions.clear()
        self._executor.shutdown(wait=False)

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval_s)
            try:
                await self.refresh()
            except Exception:  # never let the poller die
                log.exception("polling the repository %s failed", self.repository)

    async def refresh(self) -> None:
        """Load sessions for new (or changed) version folders and drop removed ones."""
        assert self._refresh_lock is not None, "start() first"
        async with self._refresh_lock:
            found: dict[tuple[str, int], Path] = {}
            try:
                for model in repo.models(self.repository):
                    for version in repo.versions(self.repository, model):
                        folder = repo.version_dir(self.repository, model, version)
                        if (folder / repo.MODEL_FILE).is_file():
                            found[(model, version)] = folder
            except (OSError, repo.RepositoryError) as exc:
                log.warning("cannot read model repository: %s", exc)
                return
            for key in [k for k in self._versions if k not in found]:
                log.info("model %s version %d removed from the repository; unloading", *key)
                del self._versions[key]  # a batch already running keeps its session
            for key, folder in sorted(found.items()):
                try:
                    stamp = _stamp(folder / repo.MODEL_FILE)
                except OSError:
                    continue
                current = self._versions.get(key)
                if (current and current.stamp == stamp) or self._failed.get(key) == stamp:
                    continue
                try:
                    onnx, single_row_s = await asyncio.get_running_loop().run_in_executor(
                        self._executor, self._load_session, folder / repo.MODEL_FILE)
                except Exception as exc:  # ORT raises its own types for broken files
                    self._failed[key] = stamp
                    log.error("model %s version %d: cannot load %s (%s); not served", key[0], key[1], folder / repo.MODEL_FILE, exc)
                    continue
                self._failed.pop(key, None)
                max_batch = _declared_max_batch(folder)
                self._versions[key] = _Version(key[0], key[1], onnx, max_batch, stamp, single_row_s)
                log.info("model %s version %d loaded (input %s, max batch %d, one row in %.2f ms%s)", key[0], key[1],
                         onnx.input_shape, max_batch, 1000 * single_row_s,
                         ", run on the event loop" if single_row_s < INLINE_BUDGET_S else "")

    def _load_session(self, path: Path) -> tuple[OnnxModel, float]:
        """The version's session and its single-row run time (median of a few runs on zeros).
        ``intra_op_threads == 0`` (auto): ONNX Runtime's default thread pool, except for a model whose single
        row runs below ``INLINE_BUDGET_S``: it gets one thread, as such rows run inline on the event loop
        and waking a pool thread for them would cost more than the parallelism gains."""
        onnx = OnnxModel(path, intra_op_threads=self.intra_op_threads, spin=False)
        single_row_s = _single_row_seconds(onnx)
        if self.intra_op_threads == 0 and single_row_s < INLINE_BUDGET_S:
            small = OnnxModel(path, intra_op_threads=1, spin=False)
            small_row_s = _single_row_seconds(small)
            if small_row_s < INLINE_BUDGET_S:
                return small, small_row_s
        return onnx, single_row_s

    @staticmethod
    def _timed_run(entry: _Version, inputs: np.ndarray) -> list:
        """One run in a worker thread; single-row runs update the version's estimate (for inlining)."""
        started = time.perf_counter()
        outputs = entry.onnx.session.run(None, {repo.INPUT_NAME: inputs})
        if len(inputs) == 1:
            took = time.perf_counter() - started
            entry.single_row_s = 0.8 * entry.single_row_s + 0.2 * took
        return outputs

    def _finished(self, running: asyncio.Future) -> None:
        self._running -= 1
        if not running.cancelled():
            running.exception()  # retrieved: a run whose caller gave up must not log "never retrieved"

    # -- interface ------------------------------------------------------------------------------
    async def ready_versions(self) -> dict[str, list[int]]:
        if self._closed:
            raise BackendUnavailable("embedded backend is closed")
        out: dict[str, list[int]] = {}
        for model, version in sorted(self._versions):
            out.setdefault(model, []).append(version)
        return out

    async def infer(self, model: str, version: int | None, inputs: np.ndarray, timeout_s: float | None) -> InferenceResult:
        if self._closed:
            raise BackendUnavailable("embedded backend is closed")
        if version is None:
            ready = [v for (m, v) in self._versions if m == model]
            if not ready:
                raise ModelNotFound(f"model {model!r} is not served")
            version = max(ready)
        entry = self._versions.get((model, version))
        if entry is None:
            raise ModelNotFound(f"model {model!r} version {version} is not served")
        inputs = np.ascontiguousarray(inputs, dtype=np.float32)
        if len(inputs) > entry.max_batch:
            # Larger than one batch (the gateway refuses these; direct callers get chunks).
            parts = [await self.infer(model, version, inputs[i:i + entry.max_batch], timeout_s)
                     for i in range(0, len(inputs), entry.max_batch)]
            return InferenceResult(model, version, {k: np.concatenate([p.outputs[k] for p in parts]) for k in parts[0].outputs})
        if timeout_s is not None and timeout_s <= 0:
            raise DeadlineExceeded(f"deadline passed before model {model!r} version {version} ran")
        self.executions += 1
        started = time.perf_counter()
        if len(inputs) == 1 and entry.single_row_s < INLINE_BUDGET_S and self.inline_allowed():
            try:
                outputs = entry.onnx.session.run(None, {repo.INPUT_NAME: inputs})
            except Exception as exc:  # ORT raises its own types
                raise BackendUnavailable(f"ONNX Runtime failed on model {model} version {version}: {exc}") from exc
        else:
            self._running += 1
            running = asyncio.get_running_loop().run_in_executor(self._executor, self._timed_run, entry, inputs)
            running.add_done_callback(self._finished)  # ONNX Runtime cannot be interrupted: count it until it ends
            try:
                outputs = await (running if timeout_s is None else asyncio.wait_for(asyncio.shield(running), timeout_s))
            except asyncio.TimeoutError:
                raise DeadlineExceeded(f"no answer from model {model!r} version {version} within {timeout_s:.3f}s") from None
            except Exception as exc:  # ORT raises its own types
                raise BackendUnavailable(f"ONNX Runtime failed on model {model} version {version}: {exc}") from exc
        log.debug("model %s v%d: batch of %d rows in %.1f ms", model, version, len(inputs),
                  1000 * (time.perf_counter() - started))
        return InferenceResult(model, version, dict(zip(entry.onnx.output_names, outputs)))
