"""Which model versions the gateway serves, with their calibration; hot reload.

The registry polls ``backend.ready_versions()``. A version that becomes ready is admitted only after
its ``calibration.json`` loads and validates, the decision policy's scores (or its fallback) are among those
it serves, and one warm-up inference returns every output it serves. A version serves the scores of its
calibration that the backend returns for it (``backend.served_outputs``: a Triton config declares only the
outputs common to the versions it serves; the embedded backend serves them all); a version is re-admitted
when that set or its calibration file changes. Admission swaps one immutable
snapshot, so a request that resolved its version keeps it until it finishes, and the next request sees
the new latest version. A version that fails admission is refused with a log line, the older one stays
served, and it is retried when its calibration file changes.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable

import numpy as np

from oodguard import repository as repo
from oodguard.calibration import Calibration, CalibrationError
from oodguard.preprocess import Preprocessing

from .backend import Backend, BackendError, BackendUnavailable, DeadlineExceeded, ModelNotFound
from .decision import DecisionPolicy, DecisionRule, InputRange, PolicyError
from .quoting import quote

log = logging.getLogger("oodguard.serve.registry")

WARMUP_TIMEOUT_S = 60.0


class UnknownModel(LookupError):
    """The request names a model or version that is not served (gRPC INVALID_ARGUMENT)."""

    def __str__(self) -> str:  # LookupError quotes its argument
        return str(self.args[0]) if self.args else ""


NOTHING_SERVED = ("no model is being served (the gateway is starting, or its backend is unreachable or holds no "
                  "valid version: see its health and log)")


class NothingServed(UnknownModel):
    """No model version is served at all (starting, or the backend is unreachable): an outage, not a bad
    request (gRPC UNAVAILABLE, which clients retry)."""


@dataclass(frozen=True, eq=False)  # identity: the micro-batcher keys its lanes by the served object
class ServedVersion:
    model: str
    version: int
    calibration: Calibration
    preprocessing: Preprocessing
    input_shape: tuple[int, ...]  # per item, [C, H, W]
    max_batch: int
    class_names: tuple[str, ...]
    scores: tuple[str, ...]
    outputs: tuple[str, ...]
    stamp: object  # calibration file's (mtime, size) when loaded
    rule: DecisionRule  # the calibration's thresholds under the gateway's policy
    input_range: InputRange  # where the model's float32 input can lie (from the preprocessing)


@dataclass(frozen=True)
class Snapshot:
    versions: dict[str, dict[int, ServedVersion]]

    def latest(self, model: str) -> ServedVersion | None:
        served = self.versions.get(model)
        return served[max(served)] if served else None

    @functools.cached_property
    def largest_batch(self) -> int:
        """The largest batch any served version takes (0 while none is served); read per request, computed once
        per snapshot."""
        return max((s.max_batch for versions in self.versions.values() for s in versions.values()), default=0)


def _stamp(path: Path) -> object:
    try:
        st = path.stat()
        return (st.st_mtime_ns, st.st_size)
    except OSError:
        return None


class Registry:
    def __init__(self, backend: Backend, repository: str | Path, policy: DecisionPolicy, poll_interval_s: float = 5.0,
                 max_batch: int = 0, default_model: str = "",
                 on_state: Callable[[bool, str], Awaitable[None]] | None = None, input_range_margin: float = 0.5):
        self.backend = backend
        self.repository = Path(repository)
        self.policy = policy
        self.poll_interval_s = poll_interval_s
        self.max_batch = max_batch
        self.default_model = default_model
        self.on_state = on_state
        self.input_range_margin = input_range_margin
        self.snapshot = Snapshot({})
        #: (model, version) → (calibration stamp, reason) of versions refused
        self.refused: dict[tuple[str, int], tuple[object, str]] = {}
        self.policy_errors: dict[tuple[str, int], str] = {}
        self.backend_error: str | None = None
        self._lock = asyncio.Lock()
        self._poller: asyncio.Task | None = None
        self._refreshed = False  # the first refresh is logged by the server at startup

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        await self.refresh()
        self._poller = asyncio.create_task(self._poll_loop(), name="oodguard-registry-poll")

    async def close(self) -> None:
        if self._poller:
            self._poller.cancel()
            try:
                await self._poller
            except (asyncio.CancelledError, Exception):
                pass

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval_s)
            try:
                await self.refresh()
            except Exception:
                log.exception("refreshing the served versions failed")

    @property
    def serving(self) -> bool:
        return self.backend_error is None and any(self.snapshot.versions.values())

    async def _report(self) -> None:
        if self.on_state:
            reason = self.backend_error or ("" if self.serving else "no model version ready")
            await self.on_state(self.serving, reason)

    # -- refresh --------------------------------------------------------------------------------
    async def refresh(self) -> None:
        async with self._lock:
            try:
                ready = await self.backend.ready_versions()
            except BackendError as exc:
                if self.backend_error is None:
                    log.error("backend unavailable: %s", exc)
                self.backend_error = str(exc) or type(exc).__name__
                await self._report()
                return
            if self.backend_error is not None:
                log.info("backend reachable again")
            self.backend_error = None
            old = self.snapshot.versions
            new: dict[str, dict[int, ServedVersion]] = {}
            for model, versions in sorted(ready.items()):
                for version in sorted(versions):
                    served = await self._admit(model, version, old.get(model, {}).get(version))
                    if served is not None:
                        new.setdefault(model, {})[version] = served
            self.snapshot = Snapshot(new)  # the atomic switch
            for model in sorted(set(old) | set(new)):
                before, after = max(old.get(model, {}) or [0]), max(new.get(model, {}) or [0])
                if before != after and self._refreshed:
                    if after:
                        log.info("model %s: now serving version %d%s; %s", model, after,
                                 f" (was {before})" if before else "", describe(new[model][after]))
                    else:
                        log.warning("model %s: no version served any more (was %d)", model, before)
            self._refreshed = True
            await self._report()

    async def _admit(self, model: str, version: int, current: ServedVersion | None) -> ServedVersion | None:
        folder = repo.version_dir(self.repository, model, version)
        path = folder / repo.CALIBRATION_FILE
        try:
            available = await self.backend.served_outputs(model, version)
        except (BackendUnavailable, DeadlineExceeded, ModelNotFound) as exc:
            log.warning("model %s version %d: its outputs cannot be read (%s); will retry", model, version, exc)
            return current
        stamp = (_stamp(path), available)
        if current is not None and current.stamp == stamp:
            return current
        key = (model, version)
        if key in self.refused and self.refused[key][0] == stamp:
            return current
        try:
            served = await asyncio.to_thread(self._load, model, version, path, stamp, available)
            await self._warm_up(served)
        except (BackendUnavailable, DeadlineExceeded, ModelNotFound) as exc:
            log.warning("model %s version %d: warm-up failed (%s); will retry", model, version, exc)
            return current
        except (CalibrationError, PolicyError, ValueError, KeyError, TypeError) as exc:
            reason = str(exc)
            self.refused[key] = (stamp, reason)
            if isinstance(exc, PolicyError):
                self.policy_errors[key] = reason
            log.error("model %s version %d refused, not served: %s%s", model, version, reason,
                      f" (version {version} stays on its previous calibration)" if current else "")
            return current
        self.refused.pop(key, None)
        self.policy_errors.pop(key, None)
        return served

    def _load(self, model: str, version: int, path: Path, stamp: object,
              available: frozenset[str] | None = None) -> ServedVersion:
        calibration = Calibration.load(path)
        meta = calibration.model
        exported = tuple(str(s) for s in meta["scores"])
        scores = tuple(s for s in exported if available is None or s in available)
        if scores != exported:
            log.info("model %s version %d: score(s) %s are not served by the backend's config: not scored", model,
                     version, [s for s in exported if s not in scores])
        rule = DecisionRule(calibration, self.policy, f"model {model!r} version {version}", scores)  # PolicyError when neither the policy nor its fallback fits
        if rule.fell_back:
            how = "exports" if any(s not in exported for s in self.policy.scores) else "is served (by the backend's config) with"
            log.warning("model %s version %d %s no %s score: decided by the fallback %s(%s)", model, version, how,
                        "/".join(self.policy.scores), rule.policy.mode, ", ".join(rule.policy.scores))
        preprocessing = Preprocessing.from_dict(meta["preprocessing"])
        shape = tuple(int(d) for d in meta["input"]["shape"])
        if shape != preprocessing.input_shape:
            raise CalibrationError(f"input shape {list(shape)} disagrees with the preprocessing's {list(preprocessing.input_shape)}")
        declared = int(meta.get("max_batch_size") or 0) or 64
        max_batch = min(self.max_batch, declared) if self.max_batch else declared
        outputs = tuple(str(o) for o in meta.get("outputs", list(repo.TENSOR_OUTPUTS) + list(exported))
                        if o not in exported or o in scores)
        return ServedVersion(model, version, calibration, preprocessing, shape, max_batch,
                             tuple(calibration.class_names), scores, outputs, stamp, rule,
                             InputRange(preprocessing.mean, preprocessing.std, self.input_range_margin))

    async def _warm_up(self, served: ServedVersion) -> None:
        result = await self.backend.infer(served.model, served.version, np.zeros((1, *served.input_shape), np.float32),
                                          WARMUP_TIMEOUT_S)
        needed = list(repo.TENSOR_OUTPUTS) + list(served.scores)
        missing = [n for n in needed if n not in result.outputs]
        if missing:
            raise CalibrationError(f"the model does not return output(s) {missing} named by its calibration")
        logits = np.asarray(result.outputs["logits"])
        if logits.shape != (1, len(served.class_names)):
            raise CalibrationError(f"logits of shape {list(logits.shape)} but {len(served.class_names)} class names")

    # -- lookup ---------------------------------------------------------------------------------
    def resolve(self, model: str | None, version: int | None) -> ServedVersion:
        """The version a request runs on (``version`` None or 0: the latest served)."""
        versions = self.snapshot.versions
        if not model:
            if self.default_model:
                model = self.default_model
            elif len(versions) == 1:
                model = next(iter(versions))
            elif not versions:
                raise NothingServed(NOTHING_SERVED)
            else:
                raise UnknownModel(f"several models are served ({', '.join(sorted(versions))}): name one in 'model' "
                                   "(clients: --model NAME), or start the gateway with --default-model NAME")
        if not versions:
            raise NothingServed(NOTHING_SERVED)
        served = versions.get(model)
        if not served:
            known = ", ".join(sorted(versions)) or "none"
            raise UnknownModel(f"unknown model {quote(model)} (served: {known})")
        if not version:
            return served[max(served)]
        if version not in served:
            raise UnknownModel(f"model {model!r} has no version {version} being served (served: {sorted(served)})")
        return served[version]


def describe(served: ServedVersion) -> str:
    """One log line: the version's decision, thresholds (deciding ones marked) and their calibration figures."""
    policy = served.rule.policy
    parts = []
    for name in served.scores:
        t = served.calibration.thresholds[name]
        mark = "*" if name in policy.scores else ""
        parts.append(f"{name}{mark}>{t.threshold:.6g} (n={t.n}, TPR {t.achieved_tpr:.3f} "
                     f"[{t.achieved_tpr_ci95[0]:.3f}, {t.achieved_tpr_ci95[1]:.3f}])")
    return f"decision {policy.mode}({', '.join(policy.scores)}); thresholds: " + ", ".join(parts)
