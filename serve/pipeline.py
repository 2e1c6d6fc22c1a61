"""The request path without a transport: admission, the request's checks, conversion to the model input, the
micro-batched backend call and decision, the reply, and the queue, in that order, as one object
(:class:`PredictPipeline`) that the gRPC servicer (:mod:`oodguard.serve.service`) only translates to and from, as
MLServer's handlers call its data plane. The gateway (:mod:`oodguard.serve.server`) assembles it and runs the
lifecycle.

``predict``, in order: admission (at most ``max_inflight_requests`` calls, ``max_inflight_bytes`` request bytes
and ``max_inflight_items`` items in progress; above any, ``RESOURCE_EXHAUSTED`` "overloaded: ..." at once, before
any work; a batch above the model's limit is ``INVALID_ARGUMENT``, never "overloaded"), the request's own limits
(:mod:`oodguard.serve.inputs`), conversion to the model input (encoded images and uint8 tensors on pools of their
own, :class:`ConversionPool`), the micro-batched backend call and decision, the reply built and its size checked
against the message limit *before* anything is queued, the chosen items queued, and the reply. A request that
cannot be answered raises :class:`Refused`, naming its gRPC status code and, for a bad input, the reason the
metrics count it under.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Awaitable, Callable, Iterator

import numpy as np
from PIL import Image

from oodguard.queues.base import NewRecord, QueryQueue, QueueError
from oodguard.queues.writer import QueueWriter

from .backend import Backend, BackendUnavailable, DeadlineExceeded, ModelNotFound
from .batching import BatchDeadlineExceeded, MicroBatcher
from .decision import Decisions, PolicyError
from .inputs import (Abandoned, InputError, InputLimits, check_batch, check_request_fields, decode_images,
                     is_float_tensor, item_count, open_images, tensor_input)
from .memory import MemoryTrimmer
from .metrics import GatewayMetrics
from .registry import NothingServed, Registry, ServedVersion, UnknownModel
from .settings import Settings
from .v1 import oodguard_pb2 as pb

log = logging.getLogger("oodguard.serve")

DEFAULT_TOP_K = 3
#: a queue record id (32 hex digits, :func:`oodguard.queues.base.new_record_ids`) as long as the real ones: the
#: reply's size is measured with it in place
RECORD_ID_PLACEHOLDER = "0" * 32
#: Decision templates kept (one per served version's decision rule; cleared when full)
TEMPLATE_CACHE_SIZE = 64
#: consecutive backend calls that used their whole --backend-timeout-s before health says NOT_SERVING
BACKEND_TIMEOUTS_NOT_SERVING = 3


class Refused(Exception):
    """The request is answered with gRPC status ``code`` (its name: the pipeline knows no transport) and
    ``message``; ``reason``: a bad input's label for ``oodguard_bad_requests_total`` ("" when the refusal is not
    about the input: unknown model, shutting down, backend down)."""

    def __init__(self, code: str, message: str, reason: str = ""):
        super().__init__(message)
        self.code, self.message, self.reason = code, message, reason


class Overloaded(Exception):
    """Admission control refused the call (gRPC RESOURCE_EXHAUSTED "overloaded: ..."); ``reason`` labels it."""

    def __init__(self, message: str, reason: str):
        super().__init__(f"overloaded: {message}")
        self.reason = reason


class ConversionPool:
    """Decodes encoded images (or converts uint8 tensors) on a thread pool of its own: the gateway has one for
    each kind, so that hostile images cannot delay tensor requests, and neither can delay queue writes
    (asyncio's default pool). At most ``max_pending`` images wait for or are in conversion, over all requests;
    a request that would go above it is refused at once (:class:`Overloaded`). A request that gives up
    (cancelled, deadline) stops its decoding at the next image."""

    def __init__(self, workers: int, max_pending: int, name: str = "oodguard-decode"):
        # our pixel limit is checked from the header first (inputs.open_images); Pillow's own warning above
        # 89 M pixels would only print a line per hostile image (it names the size, so it is never deduplicated)
        warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
        self.max_pending = max_pending
        self.pending = 0
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)

    async def decode(self, request: pb.PredictRequest, served: ServedVersion, limits: InputLimits) -> np.ndarray:
        """The request's encoded images as model input: structure and headers checked, then decoded, in a
        worker thread."""
        return await self._run(len(request.images.images), self._decode, request, served, limits)

    async def convert(self, request: pb.PredictRequest, served: ServedVersion, limits: InputLimits) -> np.ndarray:
        """The request's uint8 tensor as model input (checked, then resized and normalised), in a worker thread."""
        return await self._run(item_count(request), lambda abandoned: tensor_input(request, served, limits))

    async def _run(self, n: int, work, *args) -> np.ndarray:
        if self.pending + n > self.max_pending:
            raise Overloaded(f"{self.pending} images are waiting for conversion (limit {self.max_pending}); "
                             "retry with backoff", "decode_queue")
        self.pending += n
        abandoned = threading.Event()
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, work, *args, abandoned)
        finally:
            abandoned.set()  # a cancelled request: the worker stops before its next image
            self.pending -= n

    @staticmethod
    def _decode(request: pb.PredictRequest, served: ServedVersion, limits: InputLimits,
                abandoned: threading.Event) -> np.ndarray:
        return decode_images(open_images(request, served, limits), served, abandoned)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


# -- the gateway ------------------------------------------------------------------------------------


class BatchOutcome:
    """What one micro-batch produced: the version that answered, every model output, the decisions, and
    (computed on first use, once per batch) the class probabilities and classes ranked by them."""

    def __init__(self, served: ServedVersion, outputs: dict[str, np.ndarray], decisions: Decisions):
        self.served, self.outputs, self.decisions = served, outputs, decisions
        self._probabilities: np.ndarray | None = None
        self._ranking: np.ndarray | None = None

    @property
    def probabilities(self) -> np.ndarray:
        if self._probabilities is None:
            self._probabilities = _softmax(np.asarray(self.outputs["logits"]))
        return self._probabilities

    @property
    def ranking(self) -> np.ndarray:
        """Class indices by falling probability per row (ties: the lower index first)."""
        if self._ranking is None:
            self._ranking = np.argsort(-self.probabilities, axis=1, kind="stable")
        return self._ranking


class DecisionTemplates:
    """The part of every item's ``Decision`` that is the same for all items of a version (deciding scores, mode,
    thresholds), built once per version's thresholds array and merged into each item."""

    def __init__(self) -> None:
        #: id(thresholds array of a version's decision rule) -> (that array, its Decision template)
        self._cache: dict[int, tuple[np.ndarray, pb.Decision]] = {}

    def __call__(self, decisions: Decisions) -> pb.Decision:
        key = id(decisions.thresholds)
        cached = self._cache.get(key)
        if cached is not None and cached[0] is decisions.thresholds:
            return cached[1]
        template = pb.Decision(deciding_scores=decisions.deciding, mode=decisions.mode)
        thresholds = template.thresholds
        for name, value in zip(decisions.names, decisions.thresholds.tolist()):
            thresholds[name] = value
        if len(self._cache) >= TEMPLATE_CACHE_SIZE:  # versions come and go: drop the old ones now and then
            self._cache.clear()
        # the array is kept with its template: its id cannot be reused while the entry lives
        self._cache[key] = (decisions.thresholds, template)
        return template


class PredictPipeline:
    """One gateway's request path: its admission counters, conversion pools, micro-batcher and queue writer.
    ``on_backend_failed(reason)`` / ``on_backend_ok()``: the gateway's health follows the backend's answers."""

    def __init__(self, settings: Settings, backend: Backend, registry: Registry, queue: QueryQueue,
                 metrics: GatewayMetrics, on_backend_failed: Callable[[str], Awaitable[None]],
                 on_backend_ok: Callable[[], Awaitable[None]]):
        self.settings, self.backend, self.registry, self.metrics = settings, backend, registry, metrics
        self._backend_failed, self._backend_ok = on_backend_failed, on_backend_ok
        self.input_limits = InputLimits.from_settings(settings)
        self.decoder = ConversionPool(settings.decode_workers, settings.decode_queue_max_images)
        self.tensor_converter = ConversionPool(settings.decode_workers, settings.decode_queue_max_images, "oodguard-uint8")
        self.trimmer = MemoryTrimmer()  # returns freed request memory to the OS
        self.batcher: MicroBatcher[BatchOutcome] = MicroBatcher(self.run_batch,
                                                                max_inflight=backend.max_inflight_batches,
                                                                max_wait_s=settings.max_wait_ms / 1000.0)
        self.queue_writer = QueueWriter(queue, self.batcher.after_batch)  # one put per micro-batch
        #: admission: Predict calls, request bytes and items in progress
        self.active_requests = 0
        self.inflight_bytes = 0
        self.inflight_items = 0
        self.draining = False
        self._rng = random.Random(settings.sample_seed)
        self._backend_timeouts = 0  # consecutive backend calls that used their whole backend_timeout_s
        self._templates = DecisionTemplates()

    def close(self) -> None:
        self.decoder.close()
        self.tensor_converter.close()
        self.trimmer.close()

    # -- admission ------------------------------------------------------------------------------------
    @contextmanager
    def admission(self, size: int) -> Iterator[None]:
        """A call of ``size`` request bytes in progress (the body is parsed inside); refused at once above the
        calls or bytes in progress allowed."""
        s = self.settings
        if self.active_requests >= s.max_inflight_requests:
            raise self._overloaded(f"{self.active_requests} requests in progress (limit {s.max_inflight_requests}); "
                                   "retry with backoff", "inflight_requests")
        if self.inflight_bytes + size > s.max_inflight_bytes:
            raise self._overloaded(f"{self.inflight_bytes} request bytes in progress, this request adds {size} (limit "
                                   f"{s.max_inflight_bytes}); retry with backoff", "inflight_bytes")
        self.active_requests += 1
        self.inflight_bytes += size
        try:
            yield
        finally:
            self.active_requests -= 1
            self.inflight_bytes -= size
            self.trimmer.released(size)

    def _overloaded(self, message: str, reason: str) -> Refused:
        self.metrics.request_refused(reason)
        return Refused("RESOURCE_EXHAUSTED", f"overloaded: {message}")

    # -- Predict --------------------------------------------------------------------------------------
    async def predict(self, request: pb.PredictRequest, time_remaining: float | None) -> pb.PredictResponse:
        """The request's own checks (cheap, no pixel touched), then item admission, then the work.
        ``time_remaining``: seconds left of the client's deadline (None: it set none)."""
        if self.draining:
            raise Refused("UNAVAILABLE", "server is shutting down")
        try:
            check_request_fields(request, self.input_limits)
        except InputError as exc:
            raise Refused("INVALID_ARGUMENT", str(exc), exc.reason)
        try:
            served = self.registry.resolve(request.model, request.version or None)
        except NothingServed as exc:
            raise Refused("UNAVAILABLE", str(exc))
        except UnknownModel as exc:
            raise Refused("INVALID_ARGUMENT", str(exc))
        if request.version < 0:
            raise Refused("INVALID_ARGUMENT", f"version must be >= 0, got {request.version}")
        items = item_count(request)
        if items > served.max_batch:  # can never be admitted: a bad request, not an overload
            try:
                check_batch(items, served, "the request")
            except InputError as exc:
                raise Refused("INVALID_ARGUMENT", str(exc))
        if self.inflight_items + items > self.settings.max_inflight_items:
            raise self._overloaded(f"{self.inflight_items} items in progress, this request adds {items} (limit "
                                   f"{self.settings.max_inflight_items}); retry with backoff", "inflight_items")
        self.inflight_items += items
        try:
            return await self._admitted(request, served, time_remaining)
        finally:
            self.inflight_items -= items

    async def _admitted(self, request: pb.PredictRequest, served: ServedVersion,
                        time_remaining: float | None) -> pb.PredictResponse:
        try:
            x = await self._model_input(request, served)
        except InputError as exc:
            raise Refused("INVALID_ARGUMENT", str(exc), exc.reason)
        except Overloaded as exc:
            self.metrics.request_refused(exc.reason)
            raise Refused("RESOURCE_EXHAUSTED", str(exc))
        if time_remaining is not None and time_remaining <= 0:
            raise Refused("DEADLINE_EXCEEDED", "deadline passed before inference")
        # without a client deadline the backend still gets one: a paused Triton must not hold the call forever
        limit = self.settings.backend_timeout_s
        timeout = limit if time_remaining is None else min(time_remaining, limit)
        try:
            part = await self.batcher.submit(served, x, served.max_batch, timeout)
        except ModelNotFound as exc:
            raise Refused("INVALID_ARGUMENT", str(exc))
        except (DeadlineExceeded, BatchDeadlineExceeded) as exc:
            raise Refused("DEADLINE_EXCEEDED", f"model {served.model!r} version {served.version}: {exc}")
        except BackendUnavailable as exc:
            raise Refused("UNAVAILABLE", f"backend unavailable: {exc}")
        except PolicyError as exc:
            # the served outputs lack a score the calibration decides with: seen while Triton reloads a model whose
            # config just changed (the gateway read the new config first), so a retry succeeds: UNAVAILABLE
            raise Refused("UNAVAILABLE", f"model outputs do not match its calibration: {exc}; the backend may be "
                          "reloading the model: retry")
        outcome, rows = part.result, slice(part.start, part.stop)
        # a request alone in its batch (always at low load) has every row: no slices to make
        decisions = outcome.decisions if part.stop - part.start == part.batch_rows else outcome.decisions[rows]
        chosen, sampled = self.choose_for_queue(decisions)
        response = self._response(outcome, rows, decisions, request, chosen, sampled)
        size, limit = response.ByteSize(), self.settings.max_message_bytes
        if size > limit:  # checked before queueing: no record for an answer that cannot be sent
            raise Refused("RESOURCE_EXHAUSTED", f"reply would be {size} bytes, above the limit of {limit} "
                          "(max_message_bytes); send fewer items or a smaller top_k", "reply_too_large")
        if chosen:
            try:
                ids = await self.enqueue(x, outcome, rows, decisions, request, chosen)
            except QueueError as exc:
                raise Refused("UNAVAILABLE", f"query queue unavailable, flagged items not stored: {exc}")
            for i, rid in zip(chosen, ids):
                item = response.predictions[i]
                if rid is None:
                    item.queue_status = pb.REJECTED_QUEUE_FULL
                    item.ClearField("queue_record_id")
                else:
                    item.queue_record_id = rid
        return response

    async def _model_input(self, request: pb.PredictRequest, served: ServedVersion) -> np.ndarray:
        """Float32 tensors convert inline (a view of the request's bytes); uint8 tensors on a pool of their own;
        encoded images on the decoder pool (structure and headers checked before any pixel is decoded)."""
        which = request.WhichOneof("input")
        if which is None:
            raise InputError("request has no input: set 'tensor' (raw) or 'images' (PNG/JPEG)")
        limits = self.input_limits
        if which == "images":
            try:
                return await self.decoder.decode(request, served, limits)
            except Abandoned:
                raise asyncio.CancelledError() from None
        if is_float_tensor(request):
            return tensor_input(request, served, limits)
        return await self.tensor_converter.convert(request, served, limits)

    def _response(self, outcome: "BatchOutcome", rows: slice, decisions: "Decisions", request: pb.PredictRequest,
                  chosen: list[int], sampled: list[bool]) -> pb.PredictResponse:
        """The reply, with every item that will be queued marked QUEUED under a placeholder id of the real
        ids' length (so its size is final; the ids are filled in once the queue has them)."""
        served = outcome.served
        probs = outcome.probabilities[rows]
        k = min(request.top_k or DEFAULT_TOP_K, probs.shape[1])
        ranked = outcome.ranking[rows, :k].tolist()
        probs = probs.tolist()
        names = served.class_names
        score_names = decisions.names
        template = self._templates(decisions)
        crossed, scores, p_values = decisions.crossed.tolist(), decisions.scores.tolist(), decisions.p_values.tolist()
        ood = decisions.ood.tolist()
        driver_columns = decisions.driver_columns
        queued = set(chosen)
        model, version = served.model, served.version
        response = pb.PredictResponse(model=model, version=version, request_id=request.request_id)
        add = response.predictions.add
        for i in range(len(ood)):
            row, best = probs[i], ranked[i][0]
            item = add(class_index=best, class_name=names[best], probability=row[best], model=model, version=version,
                       sampled=sampled[i])
            add_top = item.top_k.add
            for c in ranked[i]:
                add_top(index=c, name=names[c], probability=row[c])
            item_scores = item.scores
            for name, value in zip(score_names, scores[i]):
                item_scores[name] = value
            d = item.decision
            d.MergeFrom(template)  # deciding scores, mode, thresholds: the same for every item of the version
            if ood[i]:
                d.ood = True
                d.reasons.extend(decisions.reasons(i))
            if any(crossed[i]):
                d.crossed.extend([n for n, c in zip(score_names, crossed[i]) if c])
            item_p = d.p_values
            for name, value in zip(score_names, p_values[i]):
                item_p[name] = value
            if driver_columns:
                d.driver = decisions.driver(i, p_values[i])
            if i in queued:
                item.queue_status = pb.QUEUED
                item.queue_record_id = RECORD_ID_PLACEHOLDER
        return response

    # -- the queue -------------------------------------------------------------------------------------
    def choose_for_queue(self, decisions: Decisions) -> tuple[list[int], list[bool]]:
        """Which of a request's items go to the queue (every flagged one, and the sampled share of unflagged
        ones), and the sampled flags of all items."""
        fraction = self.settings.unflagged_sample_fraction
        ood = decisions.ood.tolist()
        if not fraction > 0:  # nothing sampled (the default): no random draw, as below
            return [i for i, flagged in enumerate(ood) if flagged], [False] * len(ood)
        sampled = [not flagged and self._rng.random() < fraction for flagged in ood]
        return [i for i, flagged in enumerate(ood) if flagged or sampled[i]], sampled

    async def enqueue(self, x: np.ndarray, outcome: "BatchOutcome", rows: slice, decisions: Decisions,
                      request: pb.PredictRequest, chosen: list[int]) -> list[str | None]:
        """Queue the ``chosen`` items of a request before answering. ``rows`` are the request's rows of
        ``outcome`` (its micro-batch), ``decisions`` theirs. Returns per chosen item its record id, or None
        where a full queue refused it (the queue logs and counts those). Every record of the request shares
        one metadata dict: the queue stores it once."""
        served = outcome.served
        logits, features = outcome.outputs["logits"][rows], outcome.outputs["features"][rows]
        metadata = dict(request.metadata)
        records = []
        for i in chosen:
            verdict = decisions.verdict(i)
            # "item": the record's position in its request (ties it to per-item client metadata)
            records.append(NewRecord(model=served.model, version=served.version, input=x[i], logits=logits[i],
                                     features=features[i], scores=verdict.scores,
                                     decision={**verdict.to_dict(), "item": i},
                                     flagged=verdict.ood, request_id=request.request_id, metadata=metadata))
        try:
            return await self.metrics.time_queue_write(served.model, self.queue_writer.put(records))
        except QueueError as exc:
            log.error("query queue write failed: %s", exc)
            raise

    # -- micro-batches ---------------------------------------------------------------------------------
    async def run_batch(self, served: ServedVersion, x: np.ndarray, timeout_s: float | None) -> "BatchOutcome":
        """One backend call for a micro-batch of requests, decided and counted once for all of them."""
        try:
            result = await self.metrics.time_backend(served.model, self.backend.infer(served.model, served.version, x,
                                                                                        timeout_s))
        except BackendUnavailable as exc:
            await self._backend_failed(str(exc))
            raise
        except DeadlineExceeded:
            # a call given the whole --backend-timeout-s that still got no answer: the backend hangs (a paused
            # Triton keeps its port open); a client's short deadline says nothing about the backend
            if timeout_s is not None and timeout_s >= 0.9 * self.settings.backend_timeout_s:
                self._backend_timeouts += 1
                if self._backend_timeouts >= BACKEND_TIMEOUTS_NOT_SERVING:
                    await self._backend_failed(f"{self._backend_timeouts} calls in a row got no answer within "
                                              f"--backend-timeout-s ({self.settings.backend_timeout_s:g} s)")
            raise
        self._backend_timeouts = 0
        await self._backend_ok()
        if result.version != served.version:
            served = self.registry.resolve(served.model, result.version)
        decisions = served.rule(result.outputs, served.input_range.outside(x))
        self.metrics.observe_decisions(served, decisions)
        return BatchOutcome(served, result.outputs, decisions)


__all__ = ["PredictPipeline", "Refused", "DecisionTemplates", "Overloaded", "ConversionPool", "BatchOutcome", "RECORD_ID_PLACEHOLDER",
           "BACKEND_TIMEOUTS_NOT_SERVING"]
