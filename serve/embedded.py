"""The embedded backend: ONNX Runtime in-process over the model repository, with micro-batching.

Every version folder holding a ``model.onnx`` gets a session (a folder whose model cannot be loaded is
retried when its file changes). Concurrent :meth:`EmbeddedBackend.infer` calls for the same version are
merged: while every worker is busy, the first request of a batch waits up to ``max_wait_ms`` for more;
an idle backend dispatches at once, so a lone request pays no wait. The merged batch (at most
``max_batch`` rows, never above the version's ``max_batch_size``) runs in a worker thread and the
outputs are split back. While one batch runs the next one collects, so batches grow with load.
The repository is polled every ``poll_interval_s`` for new and removed versions.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from oodguard import repository as repo
from oodguard.onnx_runner import OnnxModel

from .backend import Backend, BackendUnavailable, DeadlineExceeded, InferenceResult, ModelNotFound

log = logging.getLogger("oodguard.serve.embedded")

DEFAULT_MAX_BATCH = 64
BATCH_SIZE_HISTORY = 10_000


@dataclass
class _Pending:
    inputs: np.ndarray
    future: asyncio.Future
    deadline: float | None  # loop time


@dataclass
class _Version:
    model: str
    version: int
    onnx: OnnxModel
    max_batch: int
    stamp: tuple
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    task: asyncio.Task | None = None


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


class EmbeddedBackend(Backend):
    def __init__(self, repository: str | Path, max_wait_ms: float = 2.0, max_batch: int = 0,
                 poll_interval_s: float = 5.0, intra_op_threads: int = 0, workers: int = 1):
        self.repository = Path(repository)
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_batch = max_batch
        self.poll_interval_s = poll_interval_s
        self.intra_op_threads = intra_op_threads
        self._executor = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="oodguard-ort")
        self._run_slots: asyncio.Semaphore | None = None
        self._workers = max(1, workers)
        self._versions: dict[tuple[str, int], _Version] = {}
        self._failed: dict[tuple[str, int], tuple] = {}  # version → stamp of the model that failed to load
        self._poller: asyncio.Task | None = None
        self._refresh_lock: asyncio.Lock | None = None
        self._closed = False
        #: number of ORT executions and the batch sizes of the latest ones (tests and metrics read them;
        #: bounded, so a long-running server does not grow one entry per batch forever)
        self.executions = 0
        self.batch_sizes: collections.deque[int] = collections.deque(maxlen=BATCH_SIZE_HISTORY)

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        self._run_slots = asyncio.Semaphore(self._workers)
        self._refresh_lock = asyncio.Lock()
        await self.refresh()
        self._poller = asyncio.create_task(self._poll_loop(), name="oodguard-embedded-poll")

    async def close(self) -> None:
        self._closed = True
        if self._poller:
            self._poller.cancel()
        entries = list(self._versions.values())
        self._versions.clear()
        for v in entries:
            await self._stop_version(v)
        tasks = [v.task for v in entries if v.task]
        if tasks:
            await asyncio.wait(tasks, timeout=10)
        if self._run_slots is not None:  # wait for running batches
            for _ in range(self._workers):
                try:
                    await asyncio.wait_for(self._run_slots.acquire(), 10)
                except asyncio.TimeoutError:
                    break
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
                await self._stop_version(self._versions.pop(key))
            for key, folder in sorted(found.items()):
                try:
                    stamp = _stamp(folder / repo.MODEL_FILE)
                except OSError:
                    continue
                current = self._versions.get(key)
                if (current and current.stamp == stamp) or self._failed.get(key) == stamp:
                    continue
                try:
                    onnx = await asyncio.get_running_loop().run_in_executor(
                        self._executor, lambda f=folder: OnnxModel(f / repo.MODEL_FILE, intra_op_threads=self.intra_op_threads, spin=False))
                except Exception as exc:  # ORT raises its own types for broken files
                    self._failed[key] = stamp
                    log.error("model %s version %d: cannot load %s (%s); not served", key[0], key[1], folder / repo.MODEL_FILE, exc)
                    continue
                self._failed.pop(key, None)
                limit = _declared_max_batch(folder)
                max_batch = min(self.max_batch, limit) if self.max_batch else limit
                entry = _Version(key[0], key[1], onnx, max_batch, stamp)
                entry.task = asyncio.create_task(self._collect(entry), name=f"oodguard-batch-{key[0]}-{key[1]}")
                self._versions[key] = entry
                if current:
                    await self._stop_version(current)
                log.info("model %s version %d loaded (input %s, micro-batch up to %d)", key[0], key[1], onnx.input_shape, max_batch)

    async def _stop_version(self, entry: _Version) -> None:
        """Stop collecting for ``entry``; requests still queued for it are served first."""
        await entry.queue.put(None)

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
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        deadline = None if timeout_s is None else loop.time() + timeout_s
        await entry.queue.put(_Pending(inputs, future, deadline))
        try:
            outputs = await asyncio.wait_for(asyncio.shield(future), timeout_s)
        except asyncio.TimeoutError:
            future.cancel()
            raise DeadlineExceeded(f"no answer from model {model!r} version {version} within {timeout_s:.3f}s") from None
        return InferenceResult(model, version, outputs)

    # -- micro-batching -------------------------------------------------------------------------
    async def _collect(self, entry: _Version) -> None:
        """Merge queued requests into batches until the stop marker (None) comes out of the queue."""
        loop = asyncio.get_running_loop()
        carry: _Pending | None = None
        while True:
            first = carry if carry is not None else await entry.queue.get()
            carry = None
            if first is None:
                return
            batch, rows, stop = [first], len(first.inputs), False
            window_end = loop.time() + self.max_wait_s
            while rows < entry.max_batch:
                if entry.queue.empty():
                    if not self._run_slots.locked():
                        break  # a worker is idle: waiting would only add latency
                    remaining = window_end - loop.time()
                    if remaining <= 0:
                        break
                    try:
                        item = await asyncio.wait_for(entry.queue.get(), remaining)
                    except asyncio.TimeoutError:
                        break
                else:
                    item = entry.queue.get_nowait()
                if item is None:
                    stop = True
                    break
                if rows + len(item.inputs) > entry.max_batch:
                    carry = item
                    break
                batch.append(item)
                rows += len(item.inputs)
            await self._dispatch(entry, batch)
            if stop:
                return

    async def _dispatch(self, entry: _Version, batch: list[_Pending]) -> None:
        now = asyncio.get_running_loop().time()
        live = []
        for p in batch:
            if p.future.done():
                continue
            if p.deadline is not None and now >= p.deadline:
                p.future.set_exception(DeadlineExceeded("deadline passed while waiting for a batch"))
                continue
            live.append(p)
        if not live:
            return
        assert self._run_slots is not None
        await self._run_slots.acquire()
        task = asyncio.create_task(self._run(entry, live))
        task.add_done_callback(lambda _: self._run_slots.release())

    async def _run(self, entry: _Version, batch: list[_Pending]) -> None:
        merged = np.concatenate([p.inputs for p in batch]) if len(batch) > 1 else batch[0].inputs
        self.executions += 1
        self.batch_sizes.append(len(merged))
        started = time.perf_counter()
        try:
            outputs = await asyncio.get_running_loop().run_in_executor(self._executor, entry.onnx.session.run, None,
                                                                       {repo.INPUT_NAME: merged})
        except Exception as exc:
            error = BackendUnavailable(f"ONNX Runtime failed on model {entry.model} version {entry.version}: {exc}")
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(error)
            return
        named = dict(zip(entry.onnx.output_names, outputs))
        start = 0
        for p in batch:
            stop = start + len(p.inputs)
            if not p.future.done():
                p.future.set_result({k: v[start:stop] for k, v in named.items()})
            start = stop
        log.debug("model %s v%d: batch of %d rows (%d requests) in %.1f ms", entry.model, entry.version, len(merged),
                  len(batch), 1000 * (time.perf_counter() - started))
