"""The gRPC gateway: ``oodguard.v1.OODGuard`` + standard health + reflection, over one backend.

``Predict``: validate and convert the input (raw tensor or encoded images, with the version's recorded
preprocessing), hand it to the micro-batcher (:mod:`oodguard.serve.batching`), which merges concurrent
requests for the same version into one backend call (deadline passed on), decided with the version's
thresholds and counted in the metrics once per batch; then write the request's flagged (and sampled)
items to the query queue in a worker thread, and answer. Never imports torch.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import signal

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from oodguard.datasets import DatasetError, decode_image

from .auth import TokenAuthInterceptor, load_token, server_credentials
from .backend import Backend, BackendUnavailable, DeadlineExceeded, ModelNotFound
from .batching import BatchDeadlineExceeded, MicroBatcher
from .decision import Decisions, DecisionPolicy, PolicyError
from .metrics import GatewayMetrics
from .queue import NewRecord, QueryQueue, QueueError
from .queue_factory import describe_url
from .registry import Registry, ServedVersion, UnknownModel, describe
from .settings import Settings
from .v1 import oodguard_pb2 as pb
from .v1 import oodguard_pb2_grpc as pb_grpc

log = logging.getLogger("oodguard.serve")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["OODGuard"].full_name  # "oodguard.v1.OODGuard"
DEFAULT_TOP_K = 3
FLOAT_DTYPES = ("float32", "fp32")
UINT8_DTYPES = ("uint8",)


class InputError(ValueError):
    """The request's input is malformed (gRPC INVALID_ARGUMENT)."""


# -- input conversion (pure) ----------------------------------------------------------------------
def _check_batch(size: int, served: ServedVersion, what: str) -> None:
    if size == 0:
        raise InputError(f"empty batch: {what} holds no item")
    if size > served.max_batch:
        raise InputError(f"batch of {size} items is above the limit of {served.max_batch} for model "
                         f"{served.model!r} version {served.version}; split the request")


def _expected(served: ServedVersion) -> str:
    return f"[B,{','.join(map(str, served.input_shape))}]"


def to_model_input(request: pb.PredictRequest, served: ServedVersion) -> np.ndarray:
    """The request's input as the model's float32 ``[B, C, H, W]``; :class:`InputError` says what is wrong."""
    which = request.WhichOneof("input")
    if which is None:
        raise InputError("request has no input: set 'tensor' (raw) or 'images' (PNG/JPEG)")
    if which == "images":
        blobs = request.images.images
        _check_batch(len(blobs), served, "images")
        converted = []
        for i, blob in enumerate(blobs):
            if not blob:
                raise InputError(f"image {i} is empty")
            try:
                image = decode_image(bytes(blob), f"image {i}")
            except DatasetError as exc:
                raise InputError(str(exc)) from None
            converted.append(served.preprocessing.apply(image[None]))
        return np.concatenate(converted)

    tensor = request.tensor
    dtype = tensor.dtype.strip().lower()
    shape = [int(d) for d in tensor.shape]
    if dtype in FLOAT_DTYPES:
        np_dtype = np.dtype("<f4")
    elif dtype in UINT8_DTYPES:
        np_dtype = np.dtype("u1")
    else:
        raise InputError(f"unsupported dtype {tensor.dtype!r}: send float32 {_expected(served)} (preprocessed model input) "
                         "or uint8 images [B,H,W] / [B,H,W,C] (C = 1 or 3)")
    if not shape:
        raise InputError("tensor has no shape")
    if any(d < 0 for d in shape):
        raise InputError(f"tensor shape {shape} has a negative dimension")
    _check_batch(shape[0], served, "the tensor")
    if np_dtype.kind == "f":
        if tuple(shape[1:]) != served.input_shape:
            raise InputError(f"float32 tensor of shape {shape} does not match the model input {_expected(served)} of model "
                             f"{served.model!r} version {served.version}")
    else:
        if not (len(shape) == 3 or (len(shape) == 4 and shape[3] in (1, 3))):
            raise InputError(f"uint8 tensor of shape {shape}: images must be [B,H,W] or [B,H,W,C] with C = 1 or 3")
        if min(shape[1:3]) < 1:
            raise InputError(f"uint8 tensor of shape {shape} has an empty image dimension")
    needed = math.prod(shape) * np_dtype.itemsize
    if len(tensor.data) != needed:
        raise InputError(f"tensor data holds {len(tensor.data)} bytes but shape {shape} of {dtype} needs {needed}")
    array = np.frombuffer(tensor.data, dtype=np_dtype).reshape(shape)
    if np_dtype.kind == "f":
        # a float64 sum of float32 values cannot overflow: it is finite exactly when every value is
        if not math.isfinite(array.sum(dtype=np.float64)):
            finite = np.isfinite(array)
            bad = int((~finite).sum())
            item = int(np.argwhere(~finite)[0][0])
            raise InputError(f"tensor holds {bad} NaN/Inf value(s) (first in item {item}); inputs must be finite")
        return array  # a read-only view of the request's bytes: nothing downstream writes to it
    return served.preprocessing.apply(array)


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


# -- the service ----------------------------------------------------------------------------------
class OODGuardService(pb_grpc.OODGuardServicer):
    def __init__(self, gateway: "Gateway"):
        self.gw = gateway

    async def Predict(self, request: pb.PredictRequest, context: grpc.aio.ServicerContext) -> pb.PredictResponse:
        # metrics: counted by model, version and status, with the end-to-end latency
        self.gw.active_requests += 1
        try:
            return await self.gw.metrics.track_predict(request, context, self._predict(request, context))
        finally:
            self.gw.active_requests -= 1

    async def _predict(self, request: pb.PredictRequest, context: grpc.aio.ServicerContext) -> pb.PredictResponse:
        gw = self.gw
        if gw.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "server is shutting down")
        try:
            served = gw.registry.resolve(request.model, request.version or None)
        except UnknownModel as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if request.version < 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"version must be >= 0, got {request.version}")
        try:
            # small float32 tensors convert inline; images and uint8 tensors are decoded in a worker thread
            if request.WhichOneof("input") == "tensor" and request.tensor.dtype.strip().lower() in FLOAT_DTYPES:
                x = to_model_input(request, served)
            else:
                x = await asyncio.to_thread(to_model_input, request, served)
        except InputError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        timeout = context.time_remaining()
        if timeout is not None and timeout <= 0:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed before inference")
        try:
            part = await gw.batcher.submit(served, x, served.max_batch, timeout)
        except ModelNotFound as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except (DeadlineExceeded, BatchDeadlineExceeded) as exc:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"model {served.model!r} version {served.version}: {exc}")
        except BackendUnavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"backend unavailable: {exc}")
        except PolicyError as exc:
            await context.abort(grpc.StatusCode.INTERNAL, f"model outputs do not match its calibration: {exc}")
        outcome, rows = part.result, slice(part.start, part.stop)
        decisions = outcome.decisions[rows]
        try:
            queued, sampled = await gw.enqueue(x, outcome, rows, decisions, request)
        except QueueError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"query queue unavailable, flagged items not stored: {exc}")
        return self._response(outcome, rows, decisions, request, queued, sampled)

    @staticmethod
    def _response(outcome: "BatchOutcome", rows: slice, decisions: Decisions, request: pb.PredictRequest,
                  queued: list, sampled: list[bool]) -> pb.PredictResponse:
        served = outcome.served
        probs = outcome.probabilities[rows]
        k = min(request.top_k or DEFAULT_TOP_K, probs.shape[1])
        ranked = outcome.ranking[rows, :k].tolist()
        probs = probs.tolist()
        names = served.class_names
        score_names = decisions.names
        thresholds = dict(zip(score_names, decisions.thresholds.tolist()))
        crossed, scores, p_values = decisions.crossed.tolist(), decisions.scores.tolist(), decisions.p_values.tolist()
        ood = decisions.ood.tolist()
        response = pb.PredictResponse(model=served.model, version=served.version, request_id=request.request_id)
        for i in range(len(decisions)):
            best = ranked[i][0]
            item = response.predictions.add(
                class_index=best, class_name=names[best], probability=probs[i][best],
                model=served.model, version=served.version, sampled=sampled[i],
            )
            for c in ranked[i]:
                item.top_k.add(index=c, name=names[c], probability=probs[i][c])
            item.scores.update(zip(score_names, scores[i]))
            d = item.decision
            d.ood = ood[i]
            d.crossed.extend(n for n, c in zip(score_names, crossed[i]) if c)
            d.deciding_scores.extend(decisions.deciding)
            d.mode = decisions.mode
            d.thresholds.update(thresholds)
            d.p_values.update(zip(score_names, p_values[i]))
            status = queued[i]
            if isinstance(status, str):
                item.queue_status = pb.QUEUED
                item.queue_record_id = status
            elif status is False:
                item.queue_status = pb.REJECTED_QUEUE_FULL
            else:
                item.queue_status = pb.NOT_QUEUED
        return response

    async def ModelInfo(self, request: pb.ModelInfoRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfoResponse:
        gw = self.gw
        versions = gw.registry.snapshot.versions
        if request.model and request.model not in versions:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"unknown model {request.model!r} (served: {', '.join(sorted(versions)) or 'none'})")
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
                                        achieved_tpr_ci95_high=t.achieved_tpr_ci95[1], deciding=name in gw.policy.scores)
        return response


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


def build_backend(settings: Settings) -> Backend:
    """The backend named by ``settings.backend``; the Triton one is imported only when chosen."""
    if settings.backend == "embedded":
        from .embedded import EmbeddedBackend

        return EmbeddedBackend(settings.repository, poll_interval_s=settings.poll_interval_s,
                               intra_op_threads=settings.intra_op_threads)
    if settings.backend == "triton":
        from .triton_backend import TritonBackend

        return TritonBackend(settings.triton_url, settings.repository,
                             max_inflight_batches=settings.triton_inflight_batches)
    raise ValueError(f"unknown backend {settings.backend!r}")


def build_queue(settings: Settings) -> QueryQueue:
    """The queue named by ``settings.queue_url`` (else the SQLite file ``settings.queue_path``)."""
    from .queue_factory import open_queue

    return open_queue(settings.effective_queue_url, max_size=settings.queue_max_size,
                      full_policy=settings.queue_full_policy, spool_path=settings.queue_spool_path)


def server_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """gRPC server options of the gateway: the message size limit both ways; a port is never shared."""
    return [("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.so_reuseport", 0)]


class Gateway:
    """Owns the gRPC server, the backend, the registry and the queue. ``start`` → ``port``; ``stop`` drains."""

    def __init__(self, settings: Settings, backend: Backend | None = None, queue: QueryQueue | None = None):
        self.settings = settings
        self.policy = DecisionPolicy(tuple(settings.decision_scores), settings.decision_mode)
        self.backend = backend if backend is not None else build_backend(settings)
        self.queue = queue if queue is not None else build_queue(settings)
        self.registry = Registry(self.backend, settings.repository, self.policy, settings.poll_interval_s,
                                 settings.max_batch, settings.default_model, on_state=self._on_registry_state)
        self.health = health.aio.HealthServicer()
        self.draining = False
        self.port: int | None = None
        self.server: grpc.aio.Server | None = None
        self._rng = random.Random(settings.sample_seed)
        self._serving: bool | None = None
        self.queue_rejections = 0
        self.metrics = GatewayMetrics()
        self.metrics.bind(self)
        #: Predict calls in progress; the embedded backend runs small single rows inline only when alone
        self.active_requests = 0
        self.backend.inline_allowed = lambda: self.active_requests <= 1
        self.batcher: MicroBatcher[BatchOutcome] = MicroBatcher(self.run_batch,
                                                                max_inflight=self.backend.max_inflight_batches,
                                                                max_wait_s=settings.max_wait_ms / 1000.0)
        self.metrics_port: int | None = None

    # -- health ---------------------------------------------------------------------------------
    async def _set_serving(self, serving: bool, reason: str = "") -> None:
        if serving == self._serving:
            return
        self._serving = serving
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)
        if serving:
            log.info("health: SERVING")
        else:
            log.warning("health: NOT_SERVING (%s)", reason)

    async def _on_registry_state(self, serving: bool, reason: str) -> None:
        await self._set_serving(serving, reason)

    async def backend_failed(self, reason: str) -> None:
        self.registry.backend_error = reason
        await self._set_serving(False, f"backend unavailable: {reason}")

    async def backend_ok(self) -> None:
        if self._serving is False and self.registry.backend_error is not None:
            self.registry.backend_error = None
            await self._set_serving(self.registry.serving, "no model version ready")

    # -- queue ----------------------------------------------------------------------------------
    async def enqueue(self, x: np.ndarray, outcome: "BatchOutcome", rows: slice, decisions: Decisions,
                      request: pb.PredictRequest) -> tuple[list, list[bool]]:
        """Queue a request's flagged items (and the sampled share of unflagged ones) before answering.
        ``rows`` are the request's rows of ``outcome`` (its micro-batch), ``decisions`` theirs. Returns per
        item: record id (str), False (refused: queue full) or None (not queued); and sampled flags."""
        served = outcome.served
        fraction = self.settings.unflagged_sample_fraction
        ood = decisions.ood.tolist()
        sampled = [not flagged and fraction > 0 and self._rng.random() < fraction for flagged in ood]
        chosen = [i for i, flagged in enumerate(ood) if flagged or sampled[i]]
        status: list = [None] * len(ood)
        if not chosen:
            return status, sampled
        logits, features = outcome.outputs["logits"][rows], outcome.outputs["features"][rows]
        metadata = dict(request.metadata)
        records = []
        for i in chosen:
            verdict = decisions.verdict(i)
            records.append(NewRecord(model=served.model, version=served.version, input=x[i], logits=logits[i],
                                     features=features[i], scores=verdict.scores, decision=verdict.to_dict(),
                                     flagged=verdict.ood, request_id=request.request_id, metadata=metadata))
        try:
            ids = await self.metrics.time_queue_write(served.model, asyncio.to_thread(self.queue.put, records))
        except QueueError as exc:
            log.error("query queue write failed: %s", exc)
            raise
        for i, rid in zip(chosen, ids):
            status[i] = rid if rid is not None else False
        rejected = sum(rid is None for rid in ids)
        if rejected:
            self.queue_rejections += rejected
            log.warning("query queue full (%d): %d item(s) of request %r not queued", self.settings.queue_max_size,
                        rejected, request.request_id)
        return status, sampled

    # -- micro-batches --------------------------------------------------------------------------
    async def run_batch(self, served: ServedVersion, x: np.ndarray, timeout_s: float | None) -> "BatchOutcome":
        """One backend call for a micro-batch of requests, decided and counted once for all of them."""
        try:
            result = await self.metrics.time_backend(served.model, self.backend.infer(served.model, served.version, x,
                                                                                        timeout_s))
        except BackendUnavailable as exc:
            await self.backend_failed(str(exc))
            raise
        await self.backend_ok()
        if result.version != served.version:
            served = self.registry.resolve(served.model, result.version)
        decisions = served.rule(result.outputs)
        self.metrics.observe_decisions(served, decisions)
        return BatchOutcome(served, result.outputs, decisions)

    # -- lifecycle ------------------------------------------------------------------------------
    def _security(self) -> tuple[grpc.ServerCredentials | None, list]:
        """TLS credentials (None: plain TCP) and the interceptors (bearer-token check); see ``serve.auth``."""
        s = self.settings
        credentials = server_credentials(s.tls_cert, s.tls_key, s.tls_client_ca)
        token = load_token(s.auth_token, s.auth_token_file)
        interceptors = [TokenAuthInterceptor(token, on_failure=self.metrics.auth_failed)] if token else []
        if token and credentials is None:
            log.warning("bearer-token auth without TLS: the token crosses the network in clear text")
        return credentials, interceptors

    async def start(self) -> int:
        await self._set_serving(False, "starting")
        credentials, interceptors = self._security()  # TLS files and token are read before anything starts
        await self.backend.start()
        await self.registry.start()
        fatal = {k: v for k, v in self.registry.policy_errors.items() if not self.registry.snapshot.versions.get(k[0])}
        if fatal:
            raise PolicyError("; ".join(fatal.values()))
        limit = self.settings.max_message_bytes
        self.server = grpc.aio.server(interceptors=interceptors, options=server_options(limit))
        pb_grpc.add_OODGuardServicer_to_server(OODGuardService(self), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), self.server)
        if credentials is not None:
            self.port = self.server.add_secure_port(self.settings.listen, credentials)
        else:
            self.port = self.server.add_insecure_port(self.settings.listen)
        if not self.port:
            raise OSError(f"cannot listen on {self.settings.listen}")
        await self.server.start()
        host = self.settings.listen.rpartition(":")[0]
        if self.settings.metrics_port:
            self.metrics_port = self.metrics.start_server(self.settings.metrics_port, host)
            log.info("metrics on http://%s:%d/metrics", host, self.metrics_port)
        log.info("oodguard gateway listening on %s:%d (backend %s, repository %s, queue %s)", host, self.port,
                 self.settings.backend, self.settings.repository, describe_url(self.settings.effective_queue_url))
        for model, versions in sorted(self.registry.snapshot.versions.items()):
            for number in sorted(versions):
                log.info("model %s version %d: %s", model, number, describe(versions[number], self.policy))
        if not self.registry.snapshot.versions:
            log.warning("no model version ready yet; health NOT_SERVING until one is")
        return self.port

    async def stop(self, grace: float | None = None) -> None:
        """Drain: refuse new requests, let in-flight ones finish (up to ``grace`` s), then close everything."""
        grace = self.settings.drain_timeout_s if grace is None else grace
        self.draining = True
        await self.health.enter_graceful_shutdown()
        if self.server is not None:
            await self.server.stop(grace)
        self.metrics.stop_server()
        await self.registry.close()
        try:
            await self.backend.close()
        finally:
            await asyncio.to_thread(self.queue.close)
        log.info("oodguard gateway stopped")


async def serve(settings: Settings) -> int:
    """Run until SIGTERM/SIGINT, then drain and return 0."""
    gateway = Gateway(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await gateway.start()
    except BaseException:
        await gateway.stop(0)
        raise
    await stop.wait()
    log.info("signal received: draining (up to %.0fs)", settings.drain_timeout_s)
    await gateway.stop()
    return 0


def run(settings: Settings) -> int:
    logging.basicConfig(level=getattr(logging, settings.log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return asyncio.run(serve(settings))


__all__ = ["Gateway", "OODGuardService", "InputError", "to_model_input", "build_backend", "build_queue", "server_options",
           "serve", "run", "SERVICE_NAME"]
