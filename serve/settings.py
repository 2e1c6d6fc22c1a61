"""The gateway's one typed settings object, read from ``OODGUARD_*`` environment variables and flags.

Every field has an environment variable ``OODGUARD_<FIELD NAME IN UPPER CASE>`` (for example
``OODGUARD_QUEUE_MAX_SIZE=5000``, ``OODGUARD_DECISION_SCORES=sisome,energy``); a command-line flag
overrides the environment, which overrides the default. Values are validated when the object is built,
so a bad setting stops the server before it listens: each setting by the check declared next to its default
(``setting(..., check=at_least(1))``, the validators of :mod:`oodguard.serve.setting_checks`), then the
constraints relating two settings (:func:`_check_together`). ``oodguard serve``'s flags are generated from the
fields (:mod:`oodguard.serve.setting_flags`). Imports no numpy: the CLI builds its parser from these fields.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from .defaults import DEFAULT_FALLBACK, DEFAULT_SCORES
from .setting_checks import (Check, at_least, bearer_token, distinct_names, finite_seconds, fraction, full_policies,
                             host_port, in_range, one_of, positive, queue_url_form, score_names, size_at_least)

ENV_PREFIX = "OODGUARD_"
BACKENDS = ("embedded", "triton")
DECISION_MODES = ("any", "all")
#: integer settings that also take "auto" (stored as 0)
AUTO_FIELDS = ("workers",)


#: the default of a setting that has none: it must be given (flag or environment)
REQUIRED = dataclasses.MISSING


def setting(default: Any, help: str, metavar: str, *, note: str = "", check: Check | None = None,
            unchecked: str = "", **kwargs: Any) -> Any:
    """A field of :class:`Settings` with what its ``oodguard serve`` flag says
    (:func:`~oodguard.serve.setting_flags.serve_flags`): ``help`` (what it is), ``metavar``, ``note`` (what the
    default means, printed after it). The default, the environment variable and the flag's name come from the
    field itself, never retyped. ``check``: the constraint on its value (a validator of
    :mod:`oodguard.serve.setting_checks`), run when the settings are built; a numeric setting without one says why
    in ``unchecked``."""
    metadata = {"help": help, "metavar": metavar, "note": note, "check": check, "unchecked": unchecked}
    if default is REQUIRED:
        return dataclasses.field(metadata=metadata, **kwargs)
    return dataclasses.field(default=default, metadata=metadata, **kwargs)


@dataclass(frozen=True)
class WorkerSlot:
    """Which worker a gateway is: ``index`` in ``0..count-1``."""

    index: int
    count: int


class SettingsError(ValueError):
    """A setting has a bad value; the message names the setting and the environment variable."""


@dataclass(frozen=True)
class Settings:
    #: model repository folder (``<repo>/<model>/<version>/{model.onnx, calibration.json}``)
    repository: Path = setting(REQUIRED, "model repository folder", "DIR")
    #: address to listen on, HOST:PORT (port 0 picks a free port)
    listen: str = setting("127.0.0.1:50051", "address to listen on", "HOST:PORT", check=host_port)
    #: gateway processes sharing the port (``SO_REUSEPORT``), pre-forked by a supervisor
    #: (:mod:`oodguard.serve.workers`); 0 (flag and environment: ``auto``) = one per CPU core; 1 = one process, no
    #: supervisor
    workers: int = setting(
        1,
        "gateway processes sharing the port, pre-forked; each has its own backend, micro-batcher and registry, "
        "a dead one is restarted, /metrics aggregates them all",
        "N",
        note="auto: one per CPU core",
        check=in_range(0, 256, note="0 or 'auto': one per core"),
    )
    #: "embedded" (ONNX Runtime in-process) or "triton"
    backend: str = setting("embedded", "embedded (ONNX Runtime in-process) or triton", "NAME",
                           check=one_of(BACKENDS, listed=True))
    #: Triton's gRPC address, used when backend == "triton"
    triton_url: str = setting("127.0.0.1:8001", "Triton gRPC address for --backend triton", "HOST:PORT")
    #: micro-batches the gateway keeps in flight to Triton at once. 1: requests arriving while a call runs
    #: merge into the next, larger batch (cheapest per request while the gateway's own CPU is the limit);
    #: more: Triton gets the next batch before the current one returns (worth it when Triton's execution time
    #: dominates and it runs several model instances)
    triton_inflight_batches: int = setting(
        1,
        "micro-batches kept in flight to Triton at once",
        "N",
        note="requests arriving during a call merge into the next batch; raise it when Triton's execution "
             "time dominates",
        check=in_range(1, 64),
    )
    #: model used when a request names none and several models are served ("" = none)
    default_model: str = setting("", "model used when a request names none and several are served", "NAME")
    #: scores whose thresholds decide (validated against the scores the model exports); "fused" is the
    #: calibrated p-value fusion the export chooses on validation data
    decision_scores: tuple[str, ...] = setting(
        DEFAULT_SCORES,
        "scores that decide",
        "S1,S2",
        note="the calibrated p-value fusion the export chose on validation data",
        check=score_names,
    )
    #: scores that decide a version exporting not every decision score (e.g. one exported before "fused"
    #: existed; logged); empty: such a version is refused. Unset: "sisome" while deciding by the default
    #: "fused", none for any other decision_scores (a misspelt score then refuses the version, loudly)
    decision_fallback: tuple[str, ...] | None = setting(
        None,
        "scores that decide a version exporting not every --decision-scores score, e.g. one exported before "
        "fused existed",
        "S1,S2",
        note="sisome with the default fused decision, none with any other --decision-scores; 'none' refuses "
             "such versions",
        check=distinct_names,
    )
    #: "any": OOD when any deciding score crosses its threshold; "all": when all do
    decision_mode: str = setting("any", "any or all of the deciding scores must cross their thresholds", "MODE",
                                 check=one_of(DECISION_MODES))
    #: micro-batching (every backend): how long a free backend slot holds a batch smaller than max_batch
    #: for more requests, milliseconds. 0 = run at once; under load batches still form while the backend
    #: is busy (continuous batching)
    max_wait_ms: float = setting(
        0.0,
        "micro-batching: how long an idle backend waits for batch mates",
        "MS",
        note="run at once; under load, requests that arrive while the backend is busy are merged anyway",
        check=in_range(0, 10_000, unit="ms"),
    )
    #: micro-batching: largest merged batch and largest request; 0 = the model's max_batch_size (never above it)
    max_batch: int = setting(
        0,
        "largest merged batch and request",
        "N",
        note="the model's max_batch_size; 1 turns micro-batching off",
        check=at_least(0, "0 = the model's max batch size"),
    )
    #: SQLite file of the active-learning query queue (used when queue_url is empty)
    queue_path: Path = setting(Path('oodguard-queue.sqlite'), "SQLite file of the query queue", "FILE")
    #: the query queue as a URL, sqlite:///RELATIVE/PATH, sqlite:////ABSOLUTE/PATH or redis://HOST:PORT/DB (wins
    #: over queue_path; "" = queue_path)
    queue_url: str = setting(
        "",
        "the query queue as sqlite:///PATH or redis://HOST:PORT/DB (wins over --queue-path)",
        "URL",
        check=queue_url_form,
    )
    #: local spool file of the Redis queue: records written there while Redis is unreachable, replayed later
    queue_spool_path: Path = setting(
        Path('oodguard-queue.spool'),
        "spool file of the Redis queue while Redis is unreachable",
        "FILE",
    )
    #: most unharvested records the queue holds
    queue_max_size: int = setting(100000, "most unharvested records queued", "N", check=at_least(1))
    #: most stored bytes of unharvested records (arrays, scores, decision, request rows) the queue holds
    queue_max_bytes: int = setting(1024 * 1024 * 1024, "most stored bytes of unharvested records", "N",
                                   check=size_at_least(1024))
    #: what happens to a new record when the queue is full: "reject" or "evict-oldest"
    queue_full_policy: str = setting("reject", "reject or evict-oldest", "POLICY", check=one_of(full_policies))
    #: a request retried with the same request_id (same model, item positions and inputs) within this many seconds
    #: of its queued records gets their ids instead of being queued again; 0 = off
    queue_idempotency_window_s: float = setting(
        600.0,
        "a request retried with the same request_id (same model, items and inputs) within S seconds gets the "
        "ids of its queued records instead of being queued again",
        "S",
        note="0: off",
        check=finite_seconds("0 = off"),
    )
    #: fraction of unflagged items also queued (marked as sampled)
    unflagged_sample_fraction: float = setting(0.0, "fraction of unflagged items also queued", "F", check=fraction)
    #: seed of the unflagged sampling (None = random)
    sample_seed: int | None = setting(None, "seed of that sampling", "N",
                                      unchecked="any integer seeds random.Random")
    #: largest gRPC message accepted (and sent), bytes
    max_message_bytes: int = setting(16 * 1024 * 1024, "largest gRPC message accepted", "N",
                                     check=size_at_least(1024))
    #: longest request_id accepted, UTF-8 bytes (INVALID_ARGUMENT above)
    max_request_id_bytes: int = setting(256, "longest request_id accepted, UTF-8 bytes", "N", check=at_least(0))
    #: largest request metadata accepted: keys and values together, UTF-8 bytes (INVALID_ARGUMENT above)
    max_metadata_bytes: int = setting(16 * 1024, "largest request metadata, keys and values together", "N",
                                      check=at_least(0))
    #: largest encoded image accepted, in pixels (width x height, read from the header before decoding)
    max_image_pixels: int = setting(
        4096 * 4096,
        "largest encoded image, width x height, checked before decoding",
        "N",
        note="4096x4096",
        check=at_least(1),
    )
    #: most pixels of all images of one request together (encoded images and uint8 tensors)
    max_request_pixels: int = setting(
        64 * 1024 * 1024,
        "most pixels of all images of one request",
        "N",
        note="8192x8192",
        check=at_least(1),
    )
    #: threads decoding encoded images, and as many converting uint8 tensors (a pool for each: hostile images
    #: cannot starve tensor requests, neither can starve queue writes)
    decode_workers: int = setting(2, "threads decoding images, a pool of their own; as many convert uint8 tensors", "N",
                                  check=at_least(1))
    #: most images waiting for or in conversion, over all requests, in each of those pools; a request above it
    #: gets RESOURCE_EXHAUSTED
    decode_queue_max_images: int = setting(
        1024,
        "most images waiting for or in conversion, per pool; more: RESOURCE_EXHAUSTED",
        "N",
        check=at_least(1),
    )
    #: admission control: most Predict calls in progress; above it a call gets RESOURCE_EXHAUSTED at once
    max_inflight_requests: int = setting(256, "most Predict calls in progress; more: RESOURCE_EXHAUSTED at once", "N",
                                         check=at_least(1))
    #: admission control: most items (images) of all Predict calls in progress together
    max_inflight_items: int = setting(8192, "most items of all Predict calls in progress", "N", check=at_least(1))
    #: admission control: most request bytes of all Predict calls in progress together
    max_inflight_bytes: int = setting(512 * 1024 * 1024, "most request bytes of all Predict calls in progress", "N",
                                      check=at_least(1))
    #: raw float32 inputs outside the model's input range (from its preprocessing) widened by this many
    #: range widths on each side are flagged (reason input_range); inf = no check
    input_range_margin: float = setting(
        0.5,
        "flag raw float32 inputs outside the model's input range widened by F range widths per side",
        "F",
        note="inf: no check",
        check=at_least(0, "inf = no check"),
    )
    #: how often the repository / backend is polled for new versions, seconds
    poll_interval_s: float = setting(5.0, "how often new model versions are looked for", "S", check=positive)
    #: SIGTERM: how long in-flight requests get to finish, seconds
    drain_timeout_s: float = setting(30.0, "SIGTERM: time in-flight requests get to finish", "S", check=at_least(0))
    #: the longest a model call may take when the client set no deadline, seconds (a paused Triton must not hold
    #: a call forever); a client's deadline, when shorter, wins
    backend_timeout_s: float = setting(
        60.0,
        "longest a model call may take when the client set no deadline; a shorter client deadline wins",
        "S",
        check=positive,
    )
    #: ONNX Runtime intra-op threads of the embedded backend (0 = auto: ONNX Runtime's default, one thread for a
    #: model whose single row runs in under 0.5 ms: such rows run on the event loop)
    intra_op_threads: int = setting(
        0,
        "ONNX Runtime intra-op threads of the embedded backend",
        "N",
        note="auto, ONNX Runtime decides, one thread for a model whose single row runs in under 0.5 ms",
        check=at_least(0),
    )
    #: Prometheus metrics over HTTP on this port (0 = off)
    metrics_port: int = setting(0, "Prometheus metrics over HTTP on this port", "PORT", note="off",
                                check=in_range(0, 65535, note="0 = off"))
    #: address the metrics endpoint binds to ("" = the host of ``listen``)
    metrics_host: str = setting("", "address the metrics endpoint binds to", "HOST", note="the --listen host")
    #: metrics over HTTPS: certificate chain and key (PEM); both or neither
    metrics_tls_cert: Path | None = setting(None, "serve metrics over HTTPS with this certificate chain (PEM)", "FILE")
    metrics_tls_key: Path | None = setting(None, "private key (PEM) of --metrics-tls-cert", "FILE")
    #: metrics behind HTTP basic auth: a file holding one ``user:password`` line
    metrics_auth_file: Path | None = setting(
        None,
        "require HTTP basic auth on /metrics: file with one user:password line",
        "FILE",
    )
    #: TLS: server certificate chain (PEM); with tls_key the gateway accepts TLS connections only
    tls_cert: Path | None = setting(
        None,
        "TLS certificate chain (PEM); with --tls-key the gateway accepts TLS only",
        "FILE",
    )
    #: TLS: the certificate's private key (PEM)
    tls_key: Path | None = setting(None, "private key (PEM) of --tls-cert", "FILE")
    #: mutual TLS: CA bundle (PEM) that client certificates must chain to; needs tls_cert
    tls_client_ca: Path | None = setting(
        None,
        "mutual TLS: CA bundle (PEM) that client certificates must chain to",
        "FILE",
    )
    #: bearer token every call must carry as ``authorization: Bearer <token>`` ("" = no token auth)
    auth_token: str = setting(
        "",
        "require 'authorization: Bearer TOKEN' metadata (health checks stay open); prefer --auth-token-file",
        "TOKEN",
        check=bearer_token,
        repr=False,
    )
    #: file holding that token (keeps it out of the environment and the process list)
    auth_token_file: Path | None = setting(None, "file holding that token", "FILE")
    #: logging level
    log_level: str = setting("INFO", "DEBUG, INFO, WARNING, ERROR", "LEVEL")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # each setting's own constraint (an unset optional one has none)
            value, check = getattr(self, f.name), f.metadata["check"]
            problem = None if value is None or check is None else check(value)
            if problem:
                raise _bad(f.name, problem)
        _check_together(self)

    @classmethod
    def from_sources(cls, overrides: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None) -> "Settings":
        """Defaults < ``OODGUARD_*`` environment < ``overrides`` (flags; ``None`` values are ignored).

        Environment strings are converted to each field's type; lists are comma-separated."""
        env = os.environ if env is None else env
        hints = typing.get_type_hints(cls)
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            key = ENV_PREFIX + f.name.upper()
            if key in env:
                values[f.name] = _convert(f.name, key, env[key], hints[f.name])
        for name, value in (overrides or {}).items():
            if value is None:
                continue
            if name not in hints:
                raise SettingsError(f"unknown setting {name!r}")
            values[name] = _convert(name, "flag", value, hints[name]) if isinstance(value, str) else value
        if "repository" not in values:
            raise SettingsError(f"repository: give --repository or {ENV_PREFIX}REPOSITORY")
        for name in ("repository", "queue_path", "queue_spool_path"):
            if name in values:
                values[name] = Path(values[name])
        for name in ("decision_scores", "decision_fallback"):
            if values.get(name) is not None:
                values[name] = tuple(values[name])
        return cls(**values)

    @property
    def effective_workers(self) -> int:
        """``workers``, with 0 (auto) resolved to the CPU cores this process may run on."""
        return self.workers or len(os.sched_getaffinity(0))

    @property
    def effective_decision_fallback(self) -> tuple[str, ...]:
        if self.decision_fallback is not None:
            return tuple(self.decision_fallback)
        return DEFAULT_FALLBACK if tuple(self.decision_scores) == DEFAULT_SCORES else ()

    @property
    def effective_queue_url(self) -> str:
        """``queue_url`` when set, else the SQLite file ``queue_path`` as a URL: ``sqlite:///PATH`` for a relative
        path (relative to the working directory), ``sqlite:////PATH`` for an absolute one."""
        return self.queue_url or f"sqlite:///{self.queue_path}"

    def describe(self) -> str:
        return ", ".join(f"{f.name}={'***' if f.name == 'auth_token' and self.auth_token else getattr(self, f.name)}"
                         for f in dataclasses.fields(self))


def _bad(name: str, message: str) -> SettingsError:
    return SettingsError(f"{name} ({ENV_PREFIX}{name.upper()}): {message}")


def _check_together(s: Settings) -> None:
    """The constraints that relate two settings (each setting's own value is checked already)."""
    if s.backend == "triton" and not s.triton_url:
        raise _bad("triton_url", "the triton backend needs a Triton gRPC address")
    if s.max_request_pixels < s.max_image_pixels:
        raise _bad("max_request_pixels", f"must be >= max_image_pixels ({s.max_image_pixels}), "
                                         f"got {s.max_request_pixels}")
    if bool(s.metrics_tls_cert) != bool(s.metrics_tls_key):
        raise _bad("metrics_tls_key" if s.metrics_tls_cert else "metrics_tls_cert",
                   "give both metrics_tls_cert and metrics_tls_key (or neither)")
    if bool(s.tls_cert) != bool(s.tls_key):
        raise _bad("tls_key" if s.tls_cert else "tls_cert", "give both tls_cert and tls_key (or neither)")
    if s.tls_client_ca and not s.tls_cert:
        raise _bad("tls_client_ca", "mutual TLS needs tls_cert and tls_key too")
    if s.auth_token and s.auth_token_file:
        raise _bad("auth_token", "give auth_token or auth_token_file, not both")


def _convert(name: str, source: str, raw: str, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    try:
        if origin is tuple:
            return tuple(part.strip() for part in raw.split(",") if part.strip())
        if origin in (typing.Union, types.UnionType):
            if typing.get_origin(args[0]) is tuple:  # an optional list: "" or "none" is the empty list
                return () if raw.strip().lower() in ("", "none") else _convert(name, source, raw, args[0])
            if raw.strip().lower() in ("", "none"):
                return None
            return _convert(name, source, raw, args[0])
        if hint is int:
            if name in AUTO_FIELDS and raw.strip().lower() == "auto":
                return 0
            return int(raw)
        if hint is float:
            return float(raw)
        if hint is Path:
            return Path(raw)
        return raw
    except ValueError as exc:
        raise SettingsError(f"{name} ({source}): cannot read {raw!r} as {getattr(hint, '__name__', hint)}") from exc


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(Settings)]


__all__ = ["setting", "Settings", "SettingsError", "ENV_PREFIX", "field_names"]
