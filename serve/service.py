"""The ``oodguard.v1.OODGuard`` service: Predict and ModelInfo over one :class:`~oodguard.serve.server.Gateway`.

``Predict``, in order: admission (at most ``max_inflight_requests`` calls, ``max_inflight_bytes`` request
bytes and ``max_inflight_items`` items in progress; above any, ``RESOURCE_EXHAUSTED`` "overloaded: ..." at
once, before any work; a batch above the model's limit is ``INVALID_ARGUMENT``, never "overloaded"), parsing of the
body (the service is registered with raw bytes, so a body that is not a valid ``PredictRequest`` is an
``INVALID_ARGUMENT`` like any bad input, not gRPC's ``UNKNOWN`` with a traceback), the request's own limits
(:mod:`oodguard.serve.inputs`), conversion to the model input (encoded images on the gateway's own decoder
pool, :class:`ImageDecoder`), the micro-batched backend call and decision (the gateway), the reply built and
its size checked against the message limit *before* anything is queued, the flagged items queued, and the
answer. Bad requests are counted by reason and logged as one line, at most once a second (no traceback, no
client string beyond a short quote), so hostile traffic cannot flood the log.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import grpc
import numpy as np
from google.protobuf.message import DecodeError
from PIL import Image

from .backend import BackendUnavailable, DeadlineExceeded, ModelNotFound
from .batching import BatchDeadlineExceeded
from .decision import PolicyError
from .inputs import (MAX_METADATA_ENTRIES, MAX_TENSOR_DIMS, Abandoned, InputError, InputLimits, check_batch,
                     check_request_fields, decode_images, is_float_tensor, item_count, open_images, quote, tensor_input)
from oodguard.queues.base import QueueError
from .registry import NothingServed, ServedVersion, UnknownModel
from .v1 import oodguard_pb2 as pb
from .wire import MODEL_INFO_SCHEMA, Schema, TooManyFields, check_fields, predict_schema

if TYPE_CHECKING:  # pragma: no cover
    from .decision import Decisions
    from .server import BatchOutcome, Gateway

log = logging.getLogger("oodguard.serve")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["OODGuard"].full_name  # "oodguard.v1.OODGuard"
DEFAULT_TOP_K = 3
#: a queue record id (32 hex digits, :func:`oodguard.queues.base.new_record_ids`) as long as the real ones: the
#: reply's size is measured with it in place
RECORD_ID_PLACEHOLDER = "0" * 32
#: at most one log line per this many seconds for bad requests (the rest are counted in the metrics)
BAD_REQUEST_LOG_INTERVAL_S = 1.0
#: Decision templates kept (one per served version's decision rule; cleared when full)
TEMPLATE_CACHE_SIZE = 64


class Overloaded(Exception):
    """Admission control refused the call (gRPC RESOURCE_EXHAUSTED "overloaded: ..."); ``reason`` labels it."""

    def __init__(self, message: str, reason: str):
        super().__init__(f"overloaded: {message}")
        self.reason = reason


class Refusal(Exception):
    """Ends a call with ``code`` and ``message``. The handlers raise it; :meth:`OODGuardService._answer` sets the
    status and returns an empty reply. Not ``context.abort``: gRPC keeps the abort's exception in the call's
    state, and its traceback leads back to the frames holding the call, which holds that state: a reference
    cycle per refused call that kept its parsed request (megabytes for a request of images) alive until
    Python's next full garbage collection (measured: 1 GB of resident memory under a flood of refusals)."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


class RateLimitedLog:
    """One warning line at most every ``interval_s`` seconds; the lines left out are counted into the next."""

    def __init__(self, logger: logging.Logger, interval_s: float):
        self.logger, self.interval_s = logger, interval_s
        self._last = -float("inf")
        self._skipped = 0
        self._lock = threading.Lock()

    def warning(self, message: str, *args) -> None:
        with self._lock:
            now = time.monotonic()
            if now - self._last < self.interval_s:
                self._skipped += 1
                return
            skipped, self._skipped, self._last = self._skipped, 0, now
        suffix = f" (+{skipped} more since the last line)" if skipped else ""
        self.logger.warning(message + suffix, *args)


class ImageDecoder:
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


class OODGuardService:
    """The handlers; :meth:`handler` registers them with raw request bytes (parsed here)."""

    def __init__(self, gateway: "Gateway"):
        self.gw = gateway
        self.inflight_items = 0
        self.inflight_bytes = 0
        self._bad_log = RateLimitedLog(log, BAD_REQUEST_LOG_INTERVAL_S)
        #: id(thresholds array of a version's decision rule) -> (that array, its Decision template)
        self._templates: dict[int, tuple[np.ndarray, pb.Decision]] = {}
        #: the wire bounds of a Predict body, by the largest batch a served model takes (it changes with reloads)
        self._predict_schemas: dict[int, Schema] = {}

    def handler(self) -> grpc.GenericRpcHandler:
        """The service's gRPC handler; request bodies arrive as bytes (:meth:`Predict` and :meth:`ModelInfo`
        parse them) so that an undecodable body is answered INVALID_ARGUMENT."""
        def method(fn, response):
            return grpc.unary_unary_rpc_method_handler(fn, request_deserializer=None,
                                                       response_serializer=response.SerializeToString)

        return grpc.method_handlers_generic_handler(SERVICE_NAME, {
            "Predict": method(self.Predict, pb.PredictResponse),
            "ModelInfo": method(self.ModelInfo, pb.ModelInfoResponse),
        })

    # -- refusals -----------------------------------------------------------------------------------
    def _refuse(self, code: grpc.StatusCode, message: str, reason: str) -> "Refusal":
        """The refusal of a bad request (``reason``), counted, with one rate-limited log line."""
        self.gw.metrics.bad_request(reason)
        self._bad_log.warning("bad request (%s, %s): %s", reason, code.name, message)
        return Refusal(code, message)

    def _predict_schema(self) -> Schema:
        """No request may hold more images than the largest batch a served model takes (nor, with none served,
        more than can ever be admitted)."""
        most = self.gw.registry.snapshot.largest_batch() or self.gw.settings.max_inflight_items
        schema = self._predict_schemas.get(most)
        if schema is None:
            schema = self._predict_schemas[most] = predict_schema(most, MAX_METADATA_ENTRIES, MAX_TENSOR_DIMS)
        return schema

    def _parse(self, raw: bytes, message, schema: Schema) -> None:
        """Parse ``raw`` into the empty ``message``; a body that repeats a field above ``schema``'s bounds
        (counted on the wire bytes first: parsing millions of fields would hold the event loop), an undecodable
        body or invalid UTF-8 in a string field is INVALID_ARGUMENT."""
        try:
            check_fields(raw, schema)
        except TooManyFields as exc:
            raise self._refuse(grpc.StatusCode.INVALID_ARGUMENT, str(exc), "too_many_fields")
        try:
            message.MergeFromString(raw)
        except (DecodeError, ValueError) as exc:
            raise self._refuse(grpc.StatusCode.INVALID_ARGUMENT,
                               f"request body is not a valid {message.DESCRIPTOR.name} ({str(exc)[:120]})",
                               "undecodable")

    # -- Predict ----------------------------------------------------------------------------------
    async def Predict(self, raw: bytes, context: grpc.aio.ServicerContext) -> pb.PredictResponse:
        request = pb.PredictRequest()  # filled by _handle; the metrics label a failed call by its model
        return await self.gw.metrics.track_predict(
            request, context, self._answer(self._handle(raw, request, context), context, pb.PredictResponse))

    @staticmethod
    async def _answer(handling, context: grpc.aio.ServicerContext, response_type):
        """Await a handler; a :class:`Refusal` becomes the call's status (and an empty reply nobody reads)."""
        try:
            return await handling
        except Refusal as refusal:
            context.set_code(refusal.code)
            context.set_details(refusal.message)
            return response_type()

    async def _handle(self, raw: bytes, request: pb.PredictRequest,
                      context: grpc.aio.ServicerContext) -> pb.PredictResponse:
        gw = self.gw
        if gw.active_requests >= gw.settings.max_inflight_requests:
            raise self._overloaded(Overloaded(f"{gw.active_requests} requests in progress (limit "
                                                       f"{gw.settings.max_inflight_requests}); retry with backoff",
                                                       "inflight_requests"))
        size = len(raw)
        if self.inflight_bytes + size > gw.settings.max_inflight_bytes:
            raise self._overloaded(Overloaded(
                f"{self.inflight_bytes} request bytes in progress, this request adds {size} (limit "
                f"{gw.settings.max_inflight_bytes}); retry with backoff", "inflight_bytes"))
        gw.active_requests += 1
        self.inflight_bytes += size
        try:
            self._parse(raw, request, self._predict_schema())
            return await self._predict(request, context)
        finally:
            gw.active_requests -= 1
            self.inflight_bytes -= size
            gw.trimmer.released(size)

    def _overloaded(self, exc: Overloaded) -> "Refusal":
        self.gw.metrics.request_refused(exc.reason)
        return Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))

    async def _predict(self, request: pb.PredictRequest, context: grpc.aio.ServicerContext) -> pb.PredictResponse:
        """The request's own checks (cheap, no pixel touched), then item admission, then the work."""
        gw = self.gw
        if gw.draining:
            raise Refusal(grpc.StatusCode.UNAVAILABLE, "server is shutting down")
        try:
            check_request_fields(request, gw.input_limits)
        except InputError as exc:
            raise self._refuse(grpc.StatusCode.INVALID_ARGUMENT, str(exc), exc.reason)
        try:
            served = gw.registry.resolve(request.model, request.version or None)
        except NothingServed as exc:
            raise Refusal(grpc.StatusCode.UNAVAILABLE, str(exc))
        except UnknownModel as exc:
            raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if request.version < 0:
            raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, f"version must be >= 0, got {request.version}")
        items = item_count(request)
        if items > served.max_batch:  # can never be admitted: a bad request, not an overload
            try:
                check_batch(items, served, "the request")
            except InputError as exc:
                raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if self.inflight_items + items > gw.settings.max_inflight_items:
            raise self._overloaded(Overloaded(
                f"{self.inflight_items} items in progress, this request adds {items} (limit "
                f"{gw.settings.max_inflight_items}); retry with backoff", "inflight_items"))
        self.inflight_items += items
        try:
            return await self._admitted(request, served, context)
        finally:
            self.inflight_items -= items

    async def _admitted(self, request: pb.PredictRequest, served: ServedVersion,
                        context: grpc.aio.ServicerContext) -> pb.PredictResponse:
        gw = self.gw
        try:
            x = await self._model_input(request, served)
        except InputError as exc:
            raise self._refuse(grpc.StatusCode.INVALID_ARGUMENT, str(exc), exc.reason)
        except Overloaded as exc:
            raise self._overloaded(exc)
        timeout = context.time_remaining()
        if timeout is not None and timeout <= 0:
            raise Refusal(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed before inference")
        # without a client deadline the backend still gets one: a paused Triton must not hold the call forever
        timeout = gw.settings.backend_timeout_s if timeout is None else min(timeout, gw.settings.backend_timeout_s)
        try:
            part = await gw.batcher.submit(served, x, served.max_batch, timeout)
        except ModelNotFound as exc:
            raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except (DeadlineExceeded, BatchDeadlineExceeded) as exc:
            raise Refusal(grpc.StatusCode.DEADLINE_EXCEEDED, f"model {served.model!r} version {served.version}: {exc}")
        except BackendUnavailable as exc:
            raise Refusal(grpc.StatusCode.UNAVAILABLE, f"backend unavailable: {exc}")
        except PolicyError as exc:
            # the served outputs lack a score the calibration decides with: seen while Triton reloads a model whose
            # config just changed (the gateway read the new config first), so a retry succeeds: UNAVAILABLE
            raise Refusal(grpc.StatusCode.UNAVAILABLE, f"model outputs do not match its calibration: {exc}; the "
                          "backend may be reloading the model: retry")
        outcome, rows = part.result, slice(part.start, part.stop)
        # a request alone in its batch (always at low load) has every row: no slices to make
        decisions = outcome.decisions if part.stop - part.start == part.batch_rows else outcome.decisions[rows]
        chosen, sampled = gw.choose_for_queue(decisions)
        response = self._response(outcome, rows, decisions, request, chosen, sampled)
        size, limit = response.ByteSize(), gw.settings.max_message_bytes
        if size > limit:  # checked before queueing: no record for an answer that cannot be sent
            raise self._refuse(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"reply would be {size} bytes, above the limit of {limit} (max_message_bytes); "
                               "send fewer items or a smaller top_k", "reply_too_large")
        if chosen:
            try:
                ids = await gw.enqueue(x, outcome, rows, decisions, request, chosen)
            except QueueError as exc:
                raise Refusal(grpc.StatusCode.UNAVAILABLE, f"query queue unavailable, flagged items not stored: {exc}")
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
        limits = self.gw.input_limits
        if which == "images":
            try:
                return await self.gw.decoder.decode(request, served, limits)
            except Abandoned:
                raise asyncio.CancelledError() from None
        if is_float_tensor(request):
            return tensor_input(request, served, limits)
        return await self.gw.tensor_converter.convert(request, served, limits)

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
        template = self._decision_template(decisions)
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

    def _decision_template(self, decisions: "Decisions") -> pb.Decision:
        """The part of every item's ``Decision`` that is the same for all items of a version (deciding scores,
        mode, thresholds), built once per version's thresholds array and merged into each item."""
        key = id(decisions.thresholds)
        cached = self._templates.get(key)
        if cached is not None and cached[0] is decisions.thresholds:
            return cached[1]
        template = pb.Decision(deciding_scores=decisions.deciding, mode=decisions.mode)
        thresholds = template.thresholds
        for name, value in zip(decisions.names, decisions.thresholds.tolist()):
            thresholds[name] = value
        if len(self._templates) >= TEMPLATE_CACHE_SIZE:  # versions come and go: drop the old ones now and then
            self._templates.clear()
        # the array is kept with its template: its id cannot be reused while the entry lives
        self._templates[key] = (decisions.thresholds, template)
        return template

    # -- ModelInfo --------------------------------------------------------------------------------
    async def ModelInfo(self, raw: bytes, context: grpc.aio.ServicerContext) -> pb.ModelInfoResponse:
        return await self._answer(self._model_info(raw, context), context, pb.ModelInfoResponse)

    async def _model_info(self, raw: bytes, context: grpc.aio.ServicerContext) -> pb.ModelInfoResponse:
        request = pb.ModelInfoRequest()
        self._parse(raw, request, MODEL_INFO_SCHEMA)
        gw = self.gw
        versions = gw.registry.snapshot.versions
        if request.model and request.model not in versions:
            raise Refusal(grpc.StatusCode.INVALID_ARGUMENT,
                                f"unknown model {quote(request.model)} (served: {', '.join(sorted(versions)) or 'none'})")
        response = pb.ModelInfoResponse(backend=gw.settings.backend)
        response.policy.scores.extend(gw.policy.scores)
        response.policy.mode = gw.policy.mode
        for model in sorted(versions):
            if request.model and model != request.model:
                continue
            spec = response.models.add(name=model, latest_version=max(versions[model]))
            for number in sorted(versions[model]):
                served = versions[model][number]
                info = spec.versions.add(version=number, class_names=list(served.class_names), outputs=list(served.outputs))
                meta = served.calibration.model
                accuracy = meta.get("test_accuracy")
                if accuracy:
                    info.test_accuracy.overall = float(accuracy["overall"])
                    info.test_accuracy.n = int(accuracy["n"])
                    info.test_accuracy.per_class.update({str(k): float(v) for k, v in accuracy["per_class"].items()})
                    # absent from calibration.json files written before the counts were recorded: left empty
                    info.test_accuracy.per_class_n.update(
                        {str(k): int(v) for k, v in accuracy.get("per_class_n", {}).items()})
                info.input.name = str(meta["input"].get("name", "input"))
                info.input.dtype = str(meta["input"].get("dtype", "float32"))
                info.input.shape.extend(served.input_shape)
                info.input.max_batch_size = served.max_batch
                p = served.preprocessing
                info.input.preprocessing.CopyFrom(pb.Preprocessing(
                    channels=p.channels, height=p.height, width=p.width, mean=list(p.mean), std=list(p.std),
                    order=str(meta["preprocessing"].get("order", ""))))
                for name in served.scores:
                    t = served.calibration.thresholds[name]
                    info.thresholds.add(score=name, threshold=t.threshold, target_tpr=t.target_tpr, n=t.n,
                                        accepted=t.accepted, achieved_tpr=t.achieved_tpr,
                                        achieved_tpr_ci95_low=t.achieved_tpr_ci95[0],
                                        achieved_tpr_ci95_high=t.achieved_tpr_ci95[1],
                                        deciding=name in served.rule.policy.scores)
        return response


__all__ = ["OODGuardService", "ImageDecoder", "Overloaded", "RateLimitedLog", "SERVICE_NAME", "DEFAULT_TOP_K"]
