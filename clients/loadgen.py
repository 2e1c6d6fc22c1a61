"""Load generator of the gateway: ``oodguard loadgen``.

Drives ``Predict`` at a fixed concurrency (``--concurrency`` requests in flight) and, optionally, an open-loop
rate limit (``--rate`` requests per second over all workers), for ``--duration`` seconds or ``--requests``
requests, whichever comes first. Each request carries ``--batch-size`` uint8 images from the ``--data`` set
(any :func:`oodguard.datasets.load_dataset` spec, or ``synthetic:uniform|blobs[:COUNT]`` made at the model's
input size); with ``--ood-fraction F`` a request is drawn from ``--ood-data`` (default uniform noise) with
probability F. Requests are not retried: every failure is counted by its gRPC status.

The report (``--json`` for the machine-readable form used by benchmarks and alert tests): requests, ok,
errors by status, throughput, latency percentiles (p50/p90/p99 of successful calls, milliseconds, measured
from send to answer), and the share of items the gateway flagged as OOD, overall and per source (id/ood).

Bounded: at most :data:`MAX_DURATION_S` seconds and :data:`MAX_CONCURRENCY` workers; only loopback targets
unless ``allow_remote`` (a load test is not something to point at a shared gateway by accident).

Ground truth travels with the traffic: every request's metadata (stored with the records it queues) holds
``source`` (``oodguard-loadgen``), ``set`` (``id`` or ``ood``), ``dataset`` (the spec it was drawn from), and
per item, comma-separated in request order, ``indices`` (the image's index in that dataset) and ``labels``
(its true label, empty where the dataset has none). A queued record's ``decision["item"]`` is its position in
its request, so ``metadata["indices"].split(",")[decision["item"]]`` traces it back to the image.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import math
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from types import SimpleNamespace
from typing import Any

import grpc
import numpy as np

MAX_DURATION_S = 3600.0
MAX_CONCURRENCY = 1024
LOADGEN_SOURCE = "oodguard-loadgen"


@dataclass(frozen=True)
class LoadgenConfig:
    target: str
    data: str
    concurrency: int = 4
    #: requests per second over all workers; 0 = as fast as the concurrency allows
    rate: float = 0.0
    duration: float = 10.0
    #: stop after this many requests (0 = no count limit; the duration still bounds the run)
    requests: int = 0
    ood_fraction: float = 0.0
    ood_data: str = "synthetic:uniform"
    batch_size: int = 1
    #: deadline of each call, seconds
    timeout: float = 5.0
    model: str = ""
    seed: int = 0
    allow_remote: bool = False
    token: str | None = None
    tls_ca: str | None = None

    def __post_init__(self) -> None:
        if not 0 < self.duration <= MAX_DURATION_S:
            raise ValueError(f"duration must be within (0, {MAX_DURATION_S:.0f}] seconds, got {self.duration}")
        if not 1 <= self.concurrency <= MAX_CONCURRENCY:
            raise ValueError(f"concurrency must be within 1..{MAX_CONCURRENCY}, got {self.concurrency}")
        if self.rate < 0 or not math.isfinite(self.rate):
            raise ValueError(f"rate must be >= 0 (0 = unlimited), got {self.rate}")
        if self.requests < 0:
            raise ValueError(f"requests must be >= 0 (0 = until the duration ends), got {self.requests}")
        if not 0.0 <= self.ood_fraction <= 1.0:
            raise ValueError(f"ood fraction must be within [0, 1], got {self.ood_fraction}")
        if self.batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {self.batch_size}")
        if self.timeout <= 0:
            raise ValueError(f"timeout must be > 0, got {self.timeout}")
        if not self.allow_remote and not is_loopback(self.target):
            raise ValueError(f"target {self.target!r} is not a loopback address; pass --allow-remote to load it")


def is_loopback(target: str) -> bool:
    """Whether ``HOST:PORT`` (or ``[V6]:PORT``, ``unix:...``) names this machine."""
    if target.startswith("unix:"):
        return True
    host = target.rpartition(":")[0] if ":" in target else target
    host = host.removeprefix("ipv4:").removeprefix("ipv6:").strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def percentiles(latencies_s: list[float]) -> dict[str, float | None]:
    if not latencies_s:
        return {k: None for k in ("p50", "p90", "p99", "mean", "min", "max")}
    ms = np.asarray(latencies_s) * 1000.0
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "mean": float(ms.mean()),
            "min": float(ms.min()), "max": float(ms.max())}


def _model_preprocessing(info, model: str) -> tuple[str, int, SimpleNamespace, list[str]]:
    models = {m.name: m for m in info.models}
    if not models:
        raise ValueError("the gateway serves no model yet")
    if model and model not in models:
        raise ValueError(f"model {model!r} is not served (served: {', '.join(sorted(models))})")
    spec = models[model] if model else models[sorted(models)[0]]
    latest = [v for v in spec.versions if v.version == spec.latest_version][0]
    p = latest.input.preprocessing
    return (spec.name, latest.input.max_batch_size, SimpleNamespace(channels=p.channels, height=p.height, width=p.width),
            list(latest.class_names))


def _load(spec: str, preprocessing: SimpleNamespace, seed: int):
    """The dataset (images and, where it has them, labels) that ``spec`` names, at the model's input size."""
    from oodguard.evaluation import resolve_dataset

    data = resolve_dataset(spec, preprocessing, seed=seed)
    if len(data.images) == 0:
        raise ValueError(f"dataset {spec!r} holds no image")
    return data


async def run_loadgen(config: LoadgenConfig) -> dict[str, Any]:
    """Run the load and return the report (a JSON-ready dict)."""
    c = config
    model, preprocessing, class_names = await _probe_model(c)
    sources, specs, unknown_labels = await _load_traffic(c, model, preprocessing, class_names)
    tally = await _drive(c, model, sources, specs)
    return _report(c, model, unknown_labels, sources, tally)


async def _probe_model(c: LoadgenConfig) -> tuple[str, SimpleNamespace, list[str]]:
    """The served model's name, preprocessing and class names (asked with retries: the gateway may still be starting);
    refuses a batch size the model does not take."""
    from .sdk import AsyncOODGuardClient, RetryPolicy

    async with AsyncOODGuardClient(c.target, timeout=max(c.timeout, 10.0), retry=RetryPolicy(max_attempts=5),
                                   token=c.token, root_certificates=c.tls_ca) as probe:
        info = await probe.model_info(c.model)
    model, max_batch, preprocessing, class_names = _model_preprocessing(info, c.model)
    if c.batch_size > max_batch > 0:
        raise ValueError(f"batch size {c.batch_size} is above the model's max batch size {max_batch}")
    return model, preprocessing, class_names


async def _load_traffic(c: LoadgenConfig, model: str, preprocessing: SimpleNamespace, class_names: list[str]):
    """The image sets to send (``id`` and, with an OOD fraction, ``ood``) as model inputs, their specs, and the count
    of ``id`` labels the model does not know (warned about: they would inflate the ID flag rate)."""
    sources = {"id": await asyncio.to_thread(_load, c.data, preprocessing, c.seed)}
    specs = {"id": c.data}
    from oodguard.evaluation import labels_unknown_to

    unknown_labels = labels_unknown_to(class_names, sources["id"])
    if unknown_labels:  # they are sent as in-distribution traffic: a flag rate read as ID would be too high
        print(f"loadgen: warning: --data {c.data} holds labels model {model!r} does not know "
              f"({unknown_labels} of {len(sources['id'].images)} images); they are sent and counted as "
              f"in-distribution ('id') traffic: give a set of the model's classes {class_names} to measure its "
              "false-flag rate", file=sys.stderr)
    if c.ood_fraction > 0:
        sources["ood"] = await asyncio.to_thread(_load, c.ood_data, preprocessing, c.seed + 1)
        specs["ood"] = c.ood_data
    return sources, specs, unknown_labels


@dataclass
class _Tally:
    """What the load's answers came to: latencies, errors by code, items and flags by source, versions that answered."""

    latencies: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    error_examples: dict[str, str] = field(default_factory=dict)
    items: Counter = field(default_factory=Counter)
    flagged: Counter = field(default_factory=Counter)
    versions: Counter[str] = field(default_factory=Counter)
    elapsed: float = 0.0


async def _drive(c: LoadgenConfig, model: str, sources: dict, specs: dict[str, str]) -> _Tally:
    """Send the load: ``c.concurrency`` workers, each sending its next request (paced by ``c.rate``, if given) until
    the duration or the request count is reached; every answer and error is tallied."""
    from .sdk import NO_RETRY, AsyncOODGuardClient, build_request

    rng = np.random.default_rng(c.seed)
    tally = _Tally()
    state = {"sent": 0}

    client = AsyncOODGuardClient(c.target, timeout=c.timeout, retry=NO_RETRY, token=c.token, root_certificates=c.tls_ca)
    loop = asyncio.get_running_loop()
    start = loop.time()
    end = start + c.duration

    def next_request() -> tuple[int, str, Any] | None:
        n = state["sent"]
        if c.requests and n >= c.requests:
            return None
        state["sent"] = n + 1
        source = "ood" if "ood" in sources and rng.random() < c.ood_fraction else "id"
        data = sources[source]
        picks = rng.integers(0, len(data.images), size=c.batch_size)
        labels = "" if data.labels is None else ",".join(str(int(data.labels[i])) for i in picks)
        request = build_request(data.images[picks], model=model, request_id=f"loadgen-{c.seed}-{n}",
                                metadata={"source": LOADGEN_SOURCE, "set": source, "dataset": specs[source],
                                          "indices": ",".join(map(str, picks.tolist())), "labels": labels})
        return n, source, request

    async def worker() -> None:
        while loop.time() < end:
            job = next_request()
            if job is None:
                return
            n, source, request = job
            if c.rate:
                delay = start + n / c.rate - loop.time()
                if start + n / c.rate >= end:
                    return
                if delay > 0:
                    await asyncio.sleep(delay)
            sent = time.perf_counter()
            try:
                response = await client.stub.Predict(request, timeout=c.timeout, metadata=client._c.metadata)
            except grpc.RpcError as exc:
                name = exc.code().name
                tally.errors[name] += 1
                tally.error_examples.setdefault(name, exc.details() or "")
                continue
            tally.latencies.append(time.perf_counter() - sent)
            tally.versions[f"{response.model}:{response.version}"] += 1
            tally.items[source] += len(response.predictions)
            tally.flagged[source] += sum(p.decision.ood for p in response.predictions)

    try:
        await asyncio.gather(*(worker() for _ in range(c.concurrency)))
    finally:
        tally.elapsed = loop.time() - start
        await client.close()
    return tally


def _report(c: LoadgenConfig, model: str, unknown_labels: int, sources: dict, tally: _Tally) -> dict[str, Any]:
    """The JSON-ready report: the config (no token), counts, rates, latency percentiles and flag shares by source."""
    elapsed, items, flagged = tally.elapsed, tally.items, tally.flagged
    ok = len(tally.latencies)
    total_items = sum(items.values())
    total_flagged = sum(flagged.values())
    return {
        "config": {k: v for k, v in asdict(c).items() if k not in ("token",)},
        "model": model,
        "id_labels_unknown_to_model": unknown_labels,
        "versions": dict(tally.versions),
        "elapsed_s": elapsed,
        "requests": ok + sum(tally.errors.values()),
        "ok": ok,
        "errors": dict(tally.errors),
        "error_examples": tally.error_examples,
        "items": total_items,
        "throughput_rps": ok / elapsed if elapsed > 0 else 0.0,
        "items_per_s": total_items / elapsed if elapsed > 0 else 0.0,
        "latency_ms": percentiles(tally.latencies),
        "flagged": total_flagged,
        "flagged_share": total_flagged / total_items if total_items else None,
        "by_source": {s: {"items": items[s], "flagged": flagged[s],
                          "flagged_share": flagged[s] / items[s] if items[s] else None} for s in sources},
    }


def format_report(report: dict[str, Any]) -> str:
    def fmt(v: float | None, spec: str = ".1f") -> str:
        return "-" if v is None else format(v, spec)

    lat = report["latency_ms"]
    c = report["config"]
    lines = [
        f"target {c['target']}  model {report['model']} ({', '.join(report['versions']) or 'no answer'})  "
        f"concurrency {c['concurrency']}  rate {c['rate'] or 'unlimited'}  batch {c['batch_size']}",
        f"requests {report['requests']}  ok {report['ok']}  errors "
        + (", ".join(f"{k} {v}" for k, v in sorted(report["errors"].items())) or "none")
        + f"  in {report['elapsed_s']:.2f}s",
        f"throughput {report['throughput_rps']:.1f} req/s ({report['items_per_s']:.1f} items/s)",
        f"latency ms  p50 {fmt(lat['p50'])}  p90 {fmt(lat['p90'])}  p99 {fmt(lat['p99'])}  max {fmt(lat['max'])}",
        f"flagged {report['flagged']}/{report['items']} ({fmt(report['flagged_share'], '.3f')})  "
        + "  ".join(f"{s}: {v['flagged']}/{v['items']} ({fmt(v['flagged_share'], '.3f')})"
                    for s, v in report["by_source"].items()),
    ]
    for status, details in sorted(report.get("error_examples", {}).items()):
        lines.append(f"  {status}: {details}")
    return "\n".join(lines)


def run(args) -> int:
    """``oodguard loadgen`` (arguments from :mod:`oodguard.cli`)."""
    import os

    config = LoadgenConfig(target=args.target, data=args.data, concurrency=args.concurrency, rate=args.rate,
                           duration=args.duration, requests=args.requests, ood_fraction=args.ood_fraction,
                           ood_data=args.ood_data, batch_size=args.batch_size, timeout=args.timeout, model=args.model,
                           seed=args.seed, allow_remote=args.allow_remote, tls_ca=args.tls_ca,
                           token=os.environ.get("OODGUARD_TOKEN") or None)
    from .sdk import OODGuardError

    try:
        report = asyncio.run(run_loadgen(config))
    except OODGuardError as exc:
        raise ValueError(f"cannot reach the gateway at {config.target}: {exc}") from None
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    return 0


__all__ = ["LoadgenConfig", "run_loadgen", "format_report", "is_loopback", "percentiles", "run"]
