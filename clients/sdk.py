"""Python SDK of the oodguard gateway: :class:`OODGuardClient` (blocking) and :class:`AsyncOODGuardClient` (asyncio).

    from oodguard.clients.sdk import OODGuardClient

    with OODGuardClient("127.0.0.1:50051") as client:
        for p in client.predict(["cat.png", "dog.jpg"]):
            print(p.class_name, p.probability, p.decision.ood, p.decision.crossed)

Inputs (one item or a list of items; a batch goes in one ``Predict`` call):

* a numpy array: ``float32`` (other float dtypes are cast) is the preprocessed model input ``[C,H,W]`` (one item)
  or ``[B,C,H,W]``; ``uint8`` is images, ``[H,W]`` (one image), ``[B,H,W]`` or ``[B,H,W,C]`` with C = 1 or 3,
  converted by the server with the model's recorded preprocessing;
* a PIL image (sent PNG-encoded), a file path (``str`` / ``pathlib.Path``: the file's encoded bytes are sent
  as is) or ``bytes`` (encoded PNG/JPEG). In a list each array is one item (uint8 ``[H,W]`` / ``[H,W,C]``,
  float32 ``[C,H,W]``); arrays of one shape and dtype go as one tensor, anything else (mixed with images
  or paths, sizes that differ) as PNG-encoded images.

Every call has a deadline (``timeout`` seconds, across all attempts). Calls the server could not take now
are retried with exponential backoff and full jitter, at most ``max_attempts`` times in all and never past
the deadline: ``UNAVAILABLE`` (gateway not up yet, restarting, draining, backend down) and a
``RESOURCE_EXHAUSTED`` whose details start with ``"overloaded:"`` (the gateway's admission control: too many
requests or items in flight). Any other ``RESOURCE_EXHAUSTED`` is a message above a size limit (gRPC's
"Received message larger than max" / "Sent message larger than max", the gateway's "reply would be ... bytes")
and is not retried: the same request meets the same limit. Any other status (for example
``INVALID_ARGUMENT``: bad input, unknown model) is raised at once as :class:`OODGuardError`. Which statuses
and details are retried is :class:`RetryPolicy`'s ``retry_on`` and ``retry_details_prefixes``.
TLS (``root_certificates``; mutual TLS with ``client_certificate`` + ``client_key``; PEM bytes or file paths)
and a bearer token (``token``: metadata ``authorization: Bearer <token>`` on every call) are optional. Results are frozen dataclasses (:class:`Prediction`, :class:`Decision`).
"""

from __future__ import annotations

import asyncio
import io
import random
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Mapping, Sequence

import grpc
import numpy as np

from oodguard.serve.v1 import oodguard_pb2 as pb
from oodguard.serve.v1 import oodguard_pb2_grpc as pb_grpc

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_TIMEOUT_S = 10.0
#: gRPC statuses retried by default: the server could not take the call now; nothing else is retried.
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})
#: how the gateway's admission control starts the details of its RESOURCE_EXHAUSTED (too much in flight)
OVERLOADED_PREFIX = "overloaded:"
#: statuses retried only when their details start with one of the prefixes: RESOURCE_EXHAUSTED only when
#: overloaded, not when a message is above a size limit (a retry meets the same limit)
RETRY_DETAILS_PREFIXES = MappingProxyType({grpc.StatusCode.RESOURCE_EXHAUSTED: (OVERLOADED_PREFIX,)})
#: channel options: reconnect quickly after the gateway (re)starts (gRPC's default backoff grows to 120 s).
DEFAULT_CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
)


# -- results --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClassProbability:
    index: int
    name: str
    probability: float


@dataclass(frozen=True)
class Decision:
    """The server's verdict: ``ood`` by the ``deciding`` scores (``mode`` any/all); ``crossed``: every score above
    its calibrated threshold; per score the threshold and the conformal p-value (small = unlike the ID data);
    ``reasons``: why flagged (threshold, unscorable, input_range); ``driver``: when ``fused`` decides, its
    component with the smallest p-value."""

    ood: bool
    crossed: tuple[str, ...]
    deciding: tuple[str, ...]
    mode: str
    thresholds: Mapping[str, float]
    p_values: Mapping[str, float]
    reasons: tuple[str, ...] = ()
    driver: str = ""

    @property
    def deciding_crossed(self) -> tuple[str, ...]:
        """The deciding scores that crossed their thresholds (the ones that made an OOD verdict)."""
        return tuple(s for s in self.deciding if s in self.crossed)


@dataclass(frozen=True)
class Prediction:
    class_index: int
    class_name: str
    probability: float
    top_k: tuple[ClassProbability, ...]
    #: every OOD score the model exports (higher = more OOD)
    scores: Mapping[str, float]
    decision: Decision
    model: str
    version: int
    #: the active-learning queue record id ("" when not queued)
    record_id: str = ""
    #: "QUEUED", "NOT_QUEUED" or "REJECTED_QUEUE_FULL"
    queue_status: str = "NOT_QUEUED"
    #: queued as part of the unflagged traffic sample
    sampled: bool = False
    request_id: str = ""

    @property
    def ood(self) -> bool:
        return self.decision.ood

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict."""
        out = asdict(self)
        out["scores"] = dict(self.scores)
        out["decision"]["thresholds"] = dict(self.decision.thresholds)
        out["decision"]["p_values"] = dict(self.decision.p_values)
        out["decision"]["crossed"] = list(self.decision.crossed)
        out["decision"]["deciding"] = list(self.decision.deciding)
        out["decision"]["reasons"] = list(self.decision.reasons)
        out["top_k"] = [asdict(c) for c in self.top_k]
        return out

    @classmethod
    def from_proto(cls, item: pb.Prediction, request_id: str = "") -> "Prediction":
        d = item.decision
        return cls(
            class_index=item.class_index, class_name=item.class_name, probability=float(item.probability),
            top_k=tuple(ClassProbability(c.index, c.name, float(c.probability)) for c in item.top_k),
            scores={k: float(v) for k, v in sorted(item.scores.items())},
            decision=Decision(ood=d.ood, crossed=tuple(d.crossed), deciding=tuple(d.deciding_scores), mode=d.mode,
                              thresholds={k: float(v) for k, v in sorted(d.thresholds.items())},
                              p_values={k: float(v) for k, v in sorted(d.p_values.items())},
                              reasons=tuple(d.reasons), driver=d.driver),
            model=item.model, version=int(item.version), record_id=item.queue_record_id,
            queue_status=pb.QueueStatus.Name(item.queue_status), sampled=item.sampled, request_id=request_id,
        )


def predictions_from_response(response: pb.PredictResponse) -> list[Prediction]:
    return [Prediction.from_proto(item, response.request_id) for item in response.predictions]


class OODGuardError(Exception):
    """A call failed: ``code`` (a :class:`grpc.StatusCode`), the server's ``details``, and how many ``attempts``."""

    def __init__(self, code: grpc.StatusCode, details: str, attempts: int = 1):
        super().__init__(f"{code.name}: {details}" + (f" (after {attempts} attempts)" if attempts > 1 else ""))
        self.code = code
        self.details = details
        self.attempts = attempts


# -- retries --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter: before retry n (1, 2, ...) sleep ``uniform(0, min(max_backoff_s,
    initial_backoff_s * multiplier**(n-1)))``. At most ``max_attempts`` calls in all, never past the call's deadline.

    Only ``retry_on`` statuses are retried (default ``UNAVAILABLE`` and ``RESOURCE_EXHAUSTED``), and a status
    that ``retry_details_prefixes`` names only when its details start with one of its prefixes. The default
    retries ``RESOURCE_EXHAUSTED`` only when overloaded (details ``"overloaded:..."``, the gateway's admission
    control), never a message above a size limit ("Received/Sent message larger than max", "reply would be ...
    bytes"). The prefixes given are added to the default's, replacing its own for their status (its
    RESOURCE_EXHAUSTED rule stays unless named): ``{RESOURCE_EXHAUSTED: ("",)}`` retries every RESOURCE_EXHAUSTED,
    ``{RESOURCE_EXHAUSTED: ()}`` none (as does leaving it out of ``retry_on``; prefixes of statuses outside
    ``retry_on`` are unused), ``{UNAVAILABLE: ("backend",)}`` only the UNAVAILABLE whose details start so.
    """

    max_attempts: int = 5
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 2.0
    multiplier: float = 2.0
    retry_on: frozenset = RETRYABLE
    retry_details_prefixes: Mapping[grpc.StatusCode, tuple[str, ...]] = field(
        default_factory=lambda: RETRY_DETAILS_PREFIXES, hash=False)

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if self.initial_backoff_s < 0 or self.max_backoff_s < 0 or self.multiplier < 1:
            raise ValueError("backoffs must be >= 0 and multiplier >= 1")
        if grpc.StatusCode.INVALID_ARGUMENT in self.retry_on:
            raise ValueError("INVALID_ARGUMENT is never retried: the same request fails the same way")
        prefixes = dict(RETRY_DETAILS_PREFIXES)
        for code, given in dict(self.retry_details_prefixes).items():
            given = (given,) if isinstance(given, str) else tuple(given)
            if not isinstance(code, grpc.StatusCode) or not all(isinstance(p, str) for p in given):
                raise TypeError(f"retry_details_prefixes maps grpc.StatusCode to str prefixes, "
                                f"got {code!r}: {given!r}")
            prefixes[code] = given
        object.__setattr__(self, "retry_on", frozenset(self.retry_on))
        object.__setattr__(self, "retry_details_prefixes", MappingProxyType(prefixes))

    def retries(self, code: grpc.StatusCode, details: str | None) -> bool:
        """Whether a failed attempt with this status and details is one to retry (attempts and deadline aside)."""
        if code not in self.retry_on:
            return False
        prefixes = self.retry_details_prefixes.get(code)
        return prefixes is None or (details or "").startswith(prefixes)

    def backoff(self, retry: int, rng: random.Random) -> float:
        return rng.uniform(0.0, min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (retry - 1)))


NO_RETRY = RetryPolicy(max_attempts=1)
#: ``on_retry(attempt_that_failed, error, sleep_s)``
RetryCallback = Callable[[int, grpc.RpcError, float], None]


# -- inputs ---------------------------------------------------------------------------------------
def _is_pil(obj: Any) -> bool:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a base dependency
        return False
    return isinstance(obj, Image.Image)


def _png(image: Any) -> bytes:
    from PIL import Image

    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3)):
            raise ValueError(f"only uint8 [H,W] or [H,W,1|3] arrays can be sent with encoded images, got "
                             f"{image.dtype} {list(image.shape)}")
        image = Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _encoded(item: Any) -> bytes:
    if isinstance(item, (bytes, bytearray, memoryview)):
        return bytes(item)
    if isinstance(item, (str, Path)):
        path = Path(item)
        if not path.is_file():
            raise FileNotFoundError(f"image file not found: {path}")
        return path.read_bytes()
    if _is_pil(item) or isinstance(item, np.ndarray):
        return _png(item)
    raise TypeError(f"cannot send {type(item).__name__}: give numpy arrays, PIL images, file paths or encoded bytes")


def _tensor(array: np.ndarray) -> pb.Tensor:
    if array.dtype == np.uint8:
        if array.ndim == 2:
            array = array[None]
        if array.ndim not in (3, 4) or (array.ndim == 4 and array.shape[3] not in (1, 3)):
            raise ValueError(f"uint8 images must be [H,W], [B,H,W] or [B,H,W,C] with C = 1 or 3, got {list(array.shape)}")
        dtype = "uint8"
    elif np.issubdtype(array.dtype, np.floating):
        array = array.astype("<f4", copy=False)
        if array.ndim == 3:
            array = array[None]
        if array.ndim != 4:
            raise ValueError(f"float32 model input must be [C,H,W] or [B,C,H,W], got {list(array.shape)}")
        dtype = "float32"
    else:
        raise ValueError(f"unsupported array dtype {array.dtype}: send uint8 images or float32 model input")
    array = np.ascontiguousarray(array)
    return pb.Tensor(dtype=dtype, shape=list(array.shape), data=array.tobytes())


def build_request(inputs: Any, *, model: str = "", version: int = 0, request_id: str | None = None,
                  metadata: Mapping[str, str] | None = None, top_k: int = 0) -> pb.PredictRequest:
    """The ``PredictRequest`` for ``inputs`` (see the module docstring for what is accepted)."""
    request = pb.PredictRequest(model=model, version=version, top_k=top_k,
                                request_id=uuid.uuid4().hex if request_id is None else request_id,
                                metadata=dict(metadata or {}))
    if isinstance(inputs, np.ndarray):
        request.tensor.CopyFrom(_tensor(inputs))
    elif isinstance(inputs, (list, tuple)):
        if not inputs:
            raise ValueError("no inputs given")
        if all(isinstance(i, np.ndarray) for i in inputs) and len({(i.dtype, i.shape) for i in inputs}) == 1:
            # one item per array (uint8 [H,W] / [H,W,C], float32 [C,H,W]) of one shape: one tensor
            request.tensor.CopyFrom(_tensor(np.stack(inputs)))
            return request
        request.images.images.extend(_encoded(i) for i in inputs)
    else:
        request.images.images.append(_encoded(inputs))
    return request


PemSource = bytes | str | Path | None


def _pem(source: PemSource) -> bytes | None:
    return Path(source).read_bytes() if isinstance(source, (str, Path)) else source


def _credentials(root_certificates: PemSource, tls: bool, client_certificate: PemSource = None,
                 client_key: PemSource = None) -> grpc.ChannelCredentials | None:
    """TLS when a root certificate, a client certificate or ``tls`` is given (no root: the system's roots)."""
    if root_certificates is None and client_certificate is None and not tls:
        return None
    if (client_certificate is None) != (client_key is None):
        raise ValueError("mutual TLS needs both client_certificate and client_key")
    return grpc.ssl_channel_credentials(root_certificates=_pem(root_certificates), private_key=_pem(client_key),
                                        certificate_chain=_pem(client_certificate))


def _options(max_message_bytes: int, tls_server_name: str | None, extra: Sequence[tuple[str, Any]]) -> list:
    options = list(DEFAULT_CHANNEL_OPTIONS) + [("grpc.max_receive_message_length", max_message_bytes),
                                               ("grpc.max_send_message_length", max_message_bytes)]
    if tls_server_name:
        options.append(("grpc.ssl_target_name_override", tls_server_name))
    return options + list(extra)


@dataclass
class _Common:
    target: str
    timeout: float
    retry: RetryPolicy
    metadata: tuple[tuple[str, str], ...]
    on_retry: RetryCallback | None
    rng: random.Random = field(default_factory=random.Random)

    def retry_delay(self, attempt: int, exc: grpc.RpcError, now: float, deadline: float) -> float | None:
        """After failed ``attempt``: the sleep before the next one (``on_retry`` told), or None: give up (a status
        not to retry, the last attempt, or the sleep would reach the deadline). The one rule of both clients."""
        delay = self.retry.backoff(attempt, self.rng)
        if (not self.retry.retries(exc.code(), exc.details()) or attempt >= self.retry.max_attempts
                or now + delay >= deadline):
            return None
        if self.on_retry:
            self.on_retry(attempt, exc, delay)
        return delay


def _common(target: str, timeout: float, retry: RetryPolicy | None, token: str | None,
            on_retry: RetryCallback | None, seed: int | None) -> _Common:
    if timeout <= 0:
        raise ValueError(f"timeout must be > 0, got {timeout}")
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    return _Common(target, timeout, retry or RetryPolicy(), metadata, on_retry, random.Random(seed))


# -- the clients ----------------------------------------------------------------------------------
class OODGuardClient:
    """Blocking client of one gateway. Thread-safe; close it (or use ``with``) to release the channel."""

    def __init__(self, target: str = DEFAULT_TARGET, *, timeout: float = DEFAULT_TIMEOUT_S,
                 retry: RetryPolicy | None = None, root_certificates: PemSource = None,
                 tls: bool = False, tls_server_name: str | None = None, token: str | None = None,
                 client_certificate: PemSource = None, client_key: PemSource = None,
                 max_message_bytes: int = 16 * 1024 * 1024, channel_options: Sequence[tuple[str, Any]] = (),
                 on_retry: RetryCallback | None = None, seed: int | None = None):
        self._c = _common(target, timeout, retry, token, on_retry, seed)
        credentials = _credentials(root_certificates, tls, client_certificate, client_key)
        options = _options(max_message_bytes, tls_server_name, channel_options)
        self.channel = (grpc.secure_channel(target, credentials, options) if credentials
                        else grpc.insecure_channel(target, options))
        self.stub = pb_grpc.OODGuardStub(self.channel)

    @property
    def target(self) -> str:
        return self._c.target

    def _call(self, method: Callable, request: Any, timeout: float | None) -> Any:
        c = self._c
        deadline = time.monotonic() + (timeout or c.timeout)
        attempt = 0
        while True:
            attempt += 1
            remaining = deadline - time.monotonic()
            try:
                if remaining <= 0:
                    raise OODGuardError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed before the call", attempt - 1)
                return method(request, timeout=remaining, metadata=c.metadata)
            except grpc.RpcError as exc:
                delay = c.retry_delay(attempt, exc, time.monotonic(), deadline)
                if delay is None:
                    raise OODGuardError(exc.code(), exc.details() or "", attempt) from None
                time.sleep(delay)

    def predict_response(self, inputs: Any, *, timeout: float | None = None, **request_fields) -> pb.PredictResponse:
        """The raw ``PredictResponse`` (``request_fields``: model, version, request_id, metadata, top_k)."""
        return self._call(self.stub.Predict, build_request(inputs, **request_fields), timeout)

    def predict(self, inputs: Any, *, model: str = "", version: int = 0, top_k: int = 0,
                request_id: str | None = None, metadata: Mapping[str, str] | None = None,
                timeout: float | None = None) -> list[Prediction]:
        """One :class:`Prediction` per item of ``inputs``, in order."""
        response = self.predict_response(inputs, timeout=timeout, model=model, version=version, top_k=top_k,
                                         request_id=request_id, metadata=metadata)
        return predictions_from_response(response)

    def predict_one(self, item: Any, **kwargs) -> Prediction:
        """The prediction of a single item (an image, a path, or one array item)."""
        if isinstance(item, np.ndarray):
            item = item[None]
        elif isinstance(item, (list, tuple)):
            raise TypeError("predict_one takes one item; use predict for a list")
        return self.predict(item, **kwargs)[0]

    def model_info(self, model: str = "", *, timeout: float | None = None) -> pb.ModelInfoResponse:
        return self._call(self.stub.ModelInfo, pb.ModelInfoRequest(model=model), timeout)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "OODGuardClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncOODGuardClient:
    """asyncio client of one gateway (``grpc.aio``); create and use it inside one running event loop."""

    def __init__(self, target: str = DEFAULT_TARGET, *, timeout: float = DEFAULT_TIMEOUT_S,
                 retry: RetryPolicy | None = None, root_certificates: PemSource = None,
                 tls: bool = False, tls_server_name: str | None = None, token: str | None = None,
                 client_certificate: PemSource = None, client_key: PemSource = None,
                 max_message_bytes: int = 16 * 1024 * 1024, channel_options: Sequence[tuple[str, Any]] = (),
                 on_retry: RetryCallback | None = None, seed: int | None = None):
        self._c = _common(target, timeout, retry, token, on_retry, seed)
        credentials = _credentials(root_certificates, tls, client_certificate, client_key)
        options = _options(max_message_bytes, tls_server_name, channel_options)
        self.channel = (grpc.aio.secure_channel(target, credentials, options) if credentials
                        else grpc.aio.insecure_channel(target, options))
        self.stub = pb_grpc.OODGuardStub(self.channel)

    @property
    def target(self) -> str:
        return self._c.target

    async def _call(self, method: Callable, request: Any, timeout: float | None) -> Any:
        c = self._c
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (timeout or c.timeout)
        attempt = 0
        while True:
            attempt += 1
            remaining = deadline - loop.time()
            try:
                if remaining <= 0:
                    raise OODGuardError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed before the call", attempt - 1)
                return await method(request, timeout=remaining, metadata=c.metadata)
            except grpc.RpcError as exc:
                delay = c.retry_delay(attempt, exc, loop.time(), deadline)
                if delay is None:
                    raise OODGuardError(exc.code(), exc.details() or "", attempt) from None
                await asyncio.sleep(delay)

    async def predict_response(self, inputs: Any, *, timeout: float | None = None, **request_fields) -> pb.PredictResponse:
        return await self._call(self.stub.Predict, build_request(inputs, **request_fields), timeout)

    async def predict(self, inputs: Any, *, model: str = "", version: int = 0, top_k: int = 0,
                      request_id: str | None = None, metadata: Mapping[str, str] | None = None,
                      timeout: float | None = None) -> list[Prediction]:
        response = await self.predict_response(inputs, timeout=timeout, model=model, version=version, top_k=top_k,
                                               request_id=request_id, metadata=metadata)
        return predictions_from_response(response)

    async def predict_one(self, item: Any, **kwargs) -> Prediction:
        if isinstance(item, np.ndarray):
            item = item[None]
        elif isinstance(item, (list, tuple)):
            raise TypeError("predict_one takes one item; use predict for a list")
        return (await self.predict(item, **kwargs))[0]

    async def model_info(self, model: str = "", *, timeout: float | None = None) -> pb.ModelInfoResponse:
        return await self._call(self.stub.ModelInfo, pb.ModelInfoRequest(model=model), timeout)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> "AsyncOODGuardClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


__all__ = ["OODGuardClient", "AsyncOODGuardClient", "Prediction", "Decision", "ClassProbability", "OODGuardError",
           "RetryPolicy", "NO_RETRY", "RETRYABLE", "OVERLOADED_PREFIX", "RETRY_DETAILS_PREFIXES", "build_request",
           "predictions_from_response", "DEFAULT_TARGET"]
