"""The Triton backend: the fused-head model served by a Triton Inference Server, reached over gRPC.

The server and the gateway read the same model repository (see :mod:`oodguard.repository`): the server
loads ``model.onnx``; this class reads each version's ``calibration.json`` to know which outputs are the
version's and which of them are scores. Triton returns a ``[B]`` score as ``[B, 1]`` (the config declares
``dims: [1] reshape: { shape: [ ] }``); :meth:`TritonBackend.infer` squeezes it back to ``[B]``.

Which outputs: one config serves every version of a model, and it declares only the outputs common to the
versions it serves (:mod:`oodguard.export.triton_config`), so a version may have scores the config leaves
out. A call asks for no output by name: Triton answers with every output of the config it has loaded (never
one the answering version lacks), and :meth:`TritonBackend.infer` keeps those the answering version's
calibration names; a score the config does not carry is not scored for that version.
:meth:`TritonBackend.served_outputs` reports the config's outputs per version from Triton's model metadata
(the registry asks at each poll and re-admits a version whose set changed). A response that lacks an output
reported there means Triton reloaded the model with a smaller config since (a new export): it is
:class:`BackendUnavailable` until the registry's next poll adopts the new set.

How Triton's failures reach the gateway (every tritonclient error is an ``InferenceServerException``
whose ``status()`` is a string such as ``'StatusCode.UNAVAILABLE'``):

* server down, stopping, restarting, overloaded, connection lost ("Stream removed"), the model known (to the
  server or in the repository) but none of its versions ready, or the requested version still loading
  → :class:`BackendUnavailable`;
* model not served at all, or the requested version not served while others are (unloaded by the version
  policy, failed to load) → :class:`ModelNotFound`;
* the call's deadline passed → :class:`DeadlineExceeded`;
* anything else (a mismatch between request and config, a failure inside the model) → :class:`BackendError`.

No torch here; grpc and tritonclient only.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import tritonclient.grpc.aio as grpcclient
from tritonclient.grpc import KeepAliveOptions
from tritonclient.utils import InferenceServerException

from oodguard.calibration import Calibration, CalibrationError
from oodguard.repository import CALIBRATION_FILE, INPUT_NAME, TENSOR_OUTPUTS, version_dir, versions

from .backend import Backend, BackendError, BackendUnavailable, DeadlineExceeded, InferenceResult, ModelNotFound

#: gRPC status codes (as tritonclient reports them) that mean "the server cannot answer now".
UNAVAILABLE_STATUSES = {"StatusCode.UNAVAILABLE", "StatusCode.RESOURCE_EXHAUSTED", "StatusCode.CANCELLED",
                        "StatusCode.ABORTED"}
NOT_FOUND_STATUSES = {"StatusCode.NOT_FOUND"}
#: Messages that mean the connection went away whatever the status says.
CONNECTION_LOST = ("Stream removed", "Socket closed", "Connection reset", "Connection refused", "failed to connect")
MAX_MESSAGE_BYTES = 2**31 - 1


class TritonBackend(Backend):
    """A Triton server at ``url`` (``host:port`` of its gRPC endpoint) serving ``repository``.

    ``max_reconnect_backoff_ms`` caps gRPC's reconnect backoff: after a server restart a long-lived
    channel is usable again within about that long (gRPC's default cap is 120 s).
    ``control_timeout_s`` bounds the calls that are not inference (repository index).
    ``max_inflight_batches``: how many (micro-batched) calls the gateway keeps in flight at once. With 1,
    requests that arrive while a call runs pile up into the next batch: fewer, larger calls, the cheapest
    per request when the gateway's CPU is the limit (docs/benchmarks.md, "triton_backend: calls in flight"). More
    lets Triton receive the next batch while one computes (its dynamic batcher and instance count decide
    how they run there).
    """

    def __init__(
        self,
        url: str,
        repository: Path,
        *,
        max_reconnect_backoff_ms: int = 500,
        control_timeout_s: float = 5.0,
        max_inflight_batches: int = 1,
    ) -> None:
        if max_inflight_batches < 1:
            raise ValueError(f"max_inflight_batches must be >= 1, got {max_inflight_batches}")
        self.max_inflight_batches = max_inflight_batches
        self.url = url.removeprefix("grpc://")
        self.repository = Path(repository)
        self.max_reconnect_backoff_ms = max_reconnect_backoff_ms
        self.control_timeout_s = control_timeout_s
        self._client: grpcclient.InferenceServerClient | None = None
        self._metadata: dict[tuple[str, int], tuple[str, tuple[str, ...], frozenset[str]]] = {}
        self._served: dict[tuple[str, int], frozenset[str]] = {}  # last served_outputs() answer per version

    # -- lifecycle ---------------------------------------------------------------------------------

    def _channel_args(self) -> list[tuple[str, int]]:
        keepalive = KeepAliveOptions()  # tritonclient's defaults: channel_args replaces all of them
        return [
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.keepalive_time_ms", keepalive.keepalive_time_ms),
            ("grpc.keepalive_timeout_ms", keepalive.keepalive_timeout_ms),
            ("grpc.keepalive_permit_without_calls", keepalive.keepalive_permit_without_calls),
            ("grpc.http2.max_pings_without_data", keepalive.http2_max_pings_without_data),
            ("grpc.initial_reconnect_backoff_ms", min(100, self.max_reconnect_backoff_ms)),
            ("grpc.min_reconnect_backoff_ms", min(100, self.max_reconnect_backoff_ms)),
            ("grpc.max_reconnect_backoff_ms", self.max_reconnect_backoff_ms),
        ]

    def _connection(self) -> grpcclient.InferenceServerClient:
        if self._client is None:
            self._client = grpcclient.InferenceServerClient(self.url, channel_args=self._channel_args())
        return self._client

    async def start(self) -> None:
        """Create the channel. The server need not be up: until it is, calls raise BackendUnavailable."""
        self._connection()

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    # -- model metadata from the repository --------------------------------------------------------

    def _version_metadata(self, model: str, version: int) -> tuple[str, tuple[str, ...], frozenset[str]]:
        """(input name, output names, score names) of one version, from its calibration.json (cached:
        a published version folder never changes)."""
        key = (model, version)
        if key not in self._metadata:
            path = version_dir(self.repository, model, version) / CALIBRATION_FILE
            if not path.parent.is_dir():
                raise ModelNotFound(f"model {model!r} has no version {version} in {self.repository}")
            try:
                info = Calibration.load(path).model
            except CalibrationError as exc:
                raise BackendError(f"model {model!r} version {version}: {exc}") from exc
            input_name = info["input"].get("name", INPUT_NAME) if isinstance(info["input"], dict) else INPUT_NAME
            outputs = tuple(info.get("outputs") or (*TENSOR_OUTPUTS, *info["scores"]))
            self._metadata[key] = (input_name, outputs, frozenset(info["scores"]))
        return self._metadata[key]

    def _input_name(self, model: str, version: int | None) -> str:
        if version is not None:
            return self._version_metadata(model, version)[0]
        # The latest version: every version of a model shares one config, so its input is the newest one's.
        found = versions(self.repository, model)
        if not found:
            raise ModelNotFound(f"model {model!r} has no version in {self.repository}")
        return self._version_metadata(model, found[-1])[0]

    async def served_outputs(self, model: str, version: int) -> frozenset[str]:
        """The outputs of the config Triton has loaded for ``version`` (its model metadata), remembered for
        :meth:`infer`'s check that the config did not shrink since."""
        try:
            metadata = await self._connection().get_model_metadata(model, str(version),
                                                                   client_timeout=self.control_timeout_s)
        except InferenceServerException as exc:
            raise await self._translate(exc, model, version) from exc
        names = frozenset(output.name for output in metadata.outputs)
        self._served[(model, version)] = names
        return names

    # -- calls ---------------------------------------------------------------------------------------

    async def infer(self, model: str, version: int | None, inputs: np.ndarray, timeout_s: float | None) -> InferenceResult:
        batch = np.ascontiguousarray(inputs, dtype=np.float32)
        tensor = grpcclient.InferInput(self._input_name(model, version), list(batch.shape), "FP32")
        tensor.set_data_from_numpy(batch)
        try:  # no output named: every output of the loaded config (the ones the answering version surely has)
            result = await self._connection().infer(
                model, [tensor], model_version="" if version is None else str(version), client_timeout=timeout_s,
            )
        except InferenceServerException as exc:
            raise await self._translate(exc, model, version) from exc

        response = result.get_response()
        answered = int(response.model_version) if response.model_version else version
        _, output_names, score_names = self._version_metadata(model, answered)
        returned = {output.name for output in response.outputs}
        dropped = self._served.get((model, answered), frozenset()) - returned
        if dropped:
            raise BackendUnavailable(f"model {model!r} version {answered}: Triton no longer serves output(s) "
                                     f"{sorted(dropped)} (it reloaded the model with a new config); the gateway "
                                     "adopts the new output set at its next poll")
        lacking = [name for name in TENSOR_OUTPUTS if name not in returned]
        if lacking:
            raise BackendError(f"model {model!r} version {answered}: no output(s) {lacking} in the response")
        outputs: dict[str, np.ndarray] = {}
        for name in output_names:
            if name not in returned:
                continue  # a score the served config does not carry: not scored for this version
            array = result.as_numpy(name)
            if name in score_names and array.ndim == 2 and array.shape[1] == 1:
                array = array[:, 0]
            if array.shape[:1] != batch.shape[:1]:
                raise BackendError(f"model {model!r} version {answered}: output {name!r} has shape "
                                   f"{list(array.shape)} for a batch of {batch.shape[0]}")
            outputs[name] = np.ascontiguousarray(array, dtype=np.float32)
        return InferenceResult(model=model, version=answered, outputs=outputs)

    async def ready_versions(self) -> dict[str, list[int]]:
        index = await self._repository_index()
        ready: dict[str, list[int]] = {}
        for entry in index:
            if entry.state == "READY" and entry.version.isdigit():
                ready.setdefault(entry.name, []).append(int(entry.version))
        return {name: sorted(found) for name, found in sorted(ready.items())}

    async def _repository_index(self):
        try:
            response = await self._connection().get_model_repository_index(client_timeout=self.control_timeout_s)
        except InferenceServerException as exc:
            raise BackendUnavailable(f"Triton at {self.url} cannot be reached: {_describe(exc)}") from exc
        return list(response.models)

    async def _translate(self, exc: InferenceServerException, model: str, version: int | None) -> BackendError:
        """The backend error for a failed inference call."""
        status, message = exc.status() or "", exc.message() or str(exc)
        what = f"model {model!r}" + ("" if version is None else f" version {version}")
        if status == "StatusCode.DEADLINE_EXCEEDED":
            return DeadlineExceeded(f"{what}: Triton did not answer before the deadline ({_describe(exc)})")
        if "unknown model" in message or status in NOT_FOUND_STATUSES:
            return await self._not_served(exc, model, version, what)
        if status in UNAVAILABLE_STATUSES or any(text in message for text in CONNECTION_LOST):
            return BackendUnavailable(f"Triton at {self.url} cannot serve {what}: {_describe(exc)}")
        return BackendError(f"Triton failed on {what}: {_describe(exc)}")

    async def _not_served(self, exc: InferenceServerException, model: str, version: int | None,
                          what: str) -> BackendError:
        """Triton does not serve the model (version) now: tell "not now" (loading, reloading, server stopping)
        from "not at all" (no such model; a version unloaded by the version policy or that failed to load)."""
        unavailable = BackendUnavailable(f"Triton at {self.url} cannot serve {what} now: {_describe(exc)}")
        try:
            index = await asyncio.wait_for(self._repository_index(), self.control_timeout_s)
        except (BackendUnavailable, asyncio.TimeoutError):
            return unavailable
        entries = [entry for entry in index if entry.name == model]
        ready = sorted(int(e.version) for e in entries if e.state == "READY" and e.version.isdigit())
        in_repository = versions(self.repository, model)
        if not ready:
            # Known to the server or in the repository it serves, but nothing ready: starting, stopping, reloading.
            return unavailable if entries or in_repository else ModelNotFound(f"{what} is not served by Triton")
        if version is None:
            return unavailable  # a version was switching under the request
        mine = [e for e in entries if e.version == str(version)]
        if (mine and mine[0].state == "LOADING") or (not mine and version in in_repository):
            return unavailable  # being loaded, or published and not yet seen by the server's poll
        state = f" ({mine[0].state}{': ' + mine[0].reason if mine[0].reason else ''})" if mine else ""
        return ModelNotFound(f"{what} is not served by Triton{state}; ready versions: {ready}")


def _describe(exc: InferenceServerException) -> str:
    status = exc.status()
    return f"{status}: {exc.message()}" if status else str(exc.message())
