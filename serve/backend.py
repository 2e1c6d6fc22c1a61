"""The backend interface: what the gateway needs from whatever runs the fused-head model.

Two implementations sit behind it: the embedded ONNX Runtime backend (default, zero setup) and the
Triton backend (``tritonclient.grpc.aio``). Nothing above this interface knows which one runs.
Both serve the same model repository (see :mod:`oodguard.repository`); the gateway reads each
version's ``calibration.json`` from that repository itself.
"""

from __future__ import annotations

import abc
from typing import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class InferenceResult:
    """What one model call returned: the version that actually answered and every output by name
    (``logits`` [B,K], ``features`` [B,D], one [B] array per score), float32, batch-first."""

    model: str
    version: int
    outputs: dict[str, np.ndarray]


class BackendError(Exception):
    """Base class of backend failures."""


class BackendUnavailable(BackendError):
    """The backend cannot answer now (server down, model unloaded, timeout): gRPC UNAVAILABLE."""


class ModelNotFound(BackendError):
    """The requested model or version is not served: gRPC INVALID_ARGUMENT (the client asked wrongly)."""


class DeadlineExceeded(BackendError):
    """The call ran past the client's deadline: gRPC DEADLINE_EXCEEDED."""


class Backend(abc.ABC):
    """One model server. All methods are coroutines; implementations must be safe under concurrency."""

    #: how many batches the gateway's micro-batcher runs on this backend at once (its capacity)
    max_inflight_batches: int = 1
    #: set by the gateway: True while it has no other request in flight. A backend that could run a small
    #: call on the event loop itself (the embedded one) does so only then; under load, handing the call to a
    #: worker keeps the loop free to take requests, which merge into the next batch.
    inline_allowed: Callable[[], bool] = staticmethod(lambda: True)

    @abc.abstractmethod
    async def start(self) -> None:
        """Connect / load; returns when the backend can report its state (it may still have no model)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release sessions and connections. Calls in flight may finish first."""

    @abc.abstractmethod
    async def infer(self, model: str, version: int | None, inputs: np.ndarray, timeout_s: float | None) -> InferenceResult:
        """Run ``inputs`` (float32 [B, C, H, W], already validated) on ``model``; ``version=None`` means
        the latest ready version. Raises :class:`ModelNotFound`, :class:`BackendUnavailable` or
        :class:`DeadlineExceeded`."""

    @abc.abstractmethod
    async def ready_versions(self) -> dict[str, list[int]]:
        """Model name → versions ready to serve now, ascending. Empty when nothing is ready.
        Raises :class:`BackendUnavailable` when the backend itself cannot be reached."""

    async def served_outputs(self, model: str, version: int) -> frozenset[str] | None:
        """The output names this backend returns for a ready version, as it serves them now; None (the default)
        means every output of the version's model. The registry asks at each poll: a version's scores are
        those of its calibration that the backend serves (a Triton config declares only the outputs common to
        the versions it serves). Raises as :meth:`infer`."""
        return None
