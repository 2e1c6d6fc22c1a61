"""The ``oodguard.v1.OODGuard`` gRPC service: it translates calls to and from the transport-free request path,
:class:`~oodguard.serve.pipeline.PredictPipeline`.

The service is registered with raw request bytes: a body is counted on the wire (:mod:`oodguard.serve.wire`),
then parsed here, so a body that is not a valid ``PredictRequest`` is an ``INVALID_ARGUMENT`` like any bad
input, not gRPC's ``UNKNOWN`` with a traceback. A :class:`~oodguard.serve.pipeline.Refused` becomes the call's
status. Bad requests are counted by reason and logged as one line, at most once a second (no traceback, no
client string beyond a short quote), so hostile traffic cannot flood the log.
"""

from __future__ import annotations

import logging
import threading
import time

import grpc
from google.protobuf.message import DecodeError

from .decision import DecisionPolicy
from .inputs import MAX_METADATA_ENTRIES, MAX_TENSOR_DIMS, quote
from .pipeline import PredictPipeline, Refused
from .v1 import oodguard_pb2 as pb
from .wire import MODEL_INFO_SCHEMA, Schema, TooManyFields, check_fields, predict_schema

log = logging.getLogger("oodguard.serve")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["OODGuard"].full_name  # "oodguard.v1.OODGuard"
#: at most one log line per this many seconds for bad requests (the rest are counted in the metrics)
BAD_REQUEST_LOG_INTERVAL_S = 1.0


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


class OODGuardService:
    """The handlers over one :class:`PredictPipeline`; :meth:`handler` registers them with raw request bytes
    (parsed here). ``policy``: the gateway's decision policy, which ModelInfo reports."""

    def __init__(self, pipeline: PredictPipeline, policy: DecisionPolicy):
        self.pipeline, self.policy = pipeline, policy
        self._bad_log = RateLimitedLog(log, BAD_REQUEST_LOG_INTERVAL_S)
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
        self.pipeline.metrics.bad_request(reason)
        self._bad_log.warning("bad request (%s, %s): %s", reason, code.name, message)
        return Refusal(code, message)

    def _predict_schema(self) -> Schema:
        """No request may hold more images than the largest batch a served model takes (nor, with none served,
        more than can ever be admitted)."""
        most = self.pipeline.registry.snapshot.largest_batch or self.pipeline.settings.max_inflight_items
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

    def _refused(self, code: str, message: str, reason: str) -> "Refusal":
        """A :class:`Refused` of the pipeline as the call's status (a bad input counted and logged)."""
        status = grpc.StatusCode[code]
        return self._refuse(status, message, reason) if reason else Refusal(status, message)

    # -- Predict ----------------------------------------------------------------------------------
    async def Predict(self, raw: bytes, context: grpc.aio.ServicerContext) -> pb.PredictResponse:
        request = pb.PredictRequest()  # filled by _handle; the metrics label a failed call by its model
        return await self.pipeline.metrics.track_predict(
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
        try:
            with self.pipeline.admission(len(raw)):
                self._parse(raw, request, self._predict_schema())
                return await self.pipeline.predict(request, context.time_remaining())
        except Refused as exc:
            # raised outside this block, from the refusal's fields: the exception's traceback holds the frames
            # that hold the request, and a chained exception would keep them alive (see Refusal)
            refused = (exc.code, exc.message, exc.reason)
        raise self._refused(*refused)

    # -- ModelInfo --------------------------------------------------------------------------------
    async def ModelInfo(self, raw: bytes, context: grpc.aio.ServicerContext) -> pb.ModelInfoResponse:
        return await self._answer(self._model_info(raw, context), context, pb.ModelInfoResponse)

    async def _model_info(self, raw: bytes, context: grpc.aio.ServicerContext) -> pb.ModelInfoResponse:
        request = pb.ModelInfoRequest()
        self._parse(raw, request, MODEL_INFO_SCHEMA)
        versions = self.pipeline.registry.snapshot.versions
        if request.model and request.model not in versions:
            raise Refusal(grpc.StatusCode.INVALID_ARGUMENT,
                                f"unknown model {quote(request.model)} (served: {', '.join(sorted(versions)) or 'none'})")
        response = pb.ModelInfoResponse(backend=self.pipeline.settings.backend)
        response.policy.scores.extend(self.policy.scores)
        response.policy.mode = self.policy.mode
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


__all__ = ["OODGuardService", "Refusal", "RateLimitedLog", "SERVICE_NAME"]
