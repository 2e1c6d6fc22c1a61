#!/usr/bin/env python
"""Serving benchmark: what the gateway costs over its backends, and what micro-batching buys.

Targets, each driven by a bounded closed loop (N workers, each sends one batch-1 request and waits for the
answer before the next) at concurrency 1, 8 and 64 for --duration seconds per cell, after --warmup seconds:

* ``ort-direct``        ONNX Runtime session in this process, N threads calling ``session.run``
* ``grpc-floor``        ``bench/grpc_floor_server.py``: a ``grpc.aio`` OODGuard server answering every Predict with
  one prebuilt response (captured from a gateway), no work at all: the transport's share of the gateway's
  overhead (client, loopback, Python gRPC server), measured in the same run; ``grpc.aio``
* ``grpc-floor-model``  the same server with ``--model``: it runs each request's tensor through the model (inline,
  a one-thread session, as the gateway's embedded backend does for a model this small) before answering: transport
  plus the model as served, the gateway's work left out (batch 1 per request: it never batches)
* ``triton-direct``     a real tritonserver (``--model-config-name=cpu``), ``tritonclient.grpc.aio``
* ``gateway-embedded``  ``oodguard serve`` (embedded ORT, micro-batching at its defaults), ``grpc.aio``
* ``gateway-triton``    ``oodguard serve --backend triton`` in front of that tritonserver, ``grpc.aio``
* ``gateway-embedded-nobatch``  as gateway-embedded with ``--max-batch 1`` (micro-batching off)
* ``gateway-embedded-flagged``  as gateway-embedded, sent only inputs the model flags (uniform noise), so every
  item is written to the query queue (a temp SQLite file) before its answer: what flagged traffic costs
* ``gateway-embedded-workers``  as gateway-embedded with ``--workers N`` (``--workers``, default 2): pre-forked
  workers sharing the port
* ``gateway-baseline``  as gateway-embedded, run from another copy of the source (``--baseline-src``: a folder
  holding an ``oodguard`` package, e.g. the last commit's tree), so a change is measured against the code before
  it in the same run; skipped without ``--baseline-src``
* ``gateway-baseline-flagged``  as gateway-baseline, sent the all-flagged traffic of gateway-embedded-flagged: what a
  change did to flagged traffic, in the same run

CPU per request: every server's process group (the gateway's supervisor and its workers; tritonserver) is read
from ``/proc/<pid>/stat`` before and after each cell, and the CPU seconds it used over the warm-up and the
measured window together are divided by the requests it answered in that time (the CPU of the load generator is
reported apart, as its share of one core). Unlike throughput, this figure barely moves when other jobs share the
machine, so the gateway's cost is compared with the floor's (``grpc-floor``: the same request and answer sizes,
no work) as CPU per request.

Servers are separate processes (the gateways are ``oodguard serve`` subprocesses), so the load generator
never shares their GIL; everything is on loopback. Cells are interleaved: for each concurrency every target
runs in turn (``--rounds`` repeats that), so machine noise hits all targets alike, and every ratio is
computed per round from two cells that ran back to back, then reported as the median over rounds. Traffic is
in-distribution digits 0-7 that the model does not flag, sent to the gateways as preprocessed float32
``[1,C,H,W]`` tensors (the shape of the model version's recorded preprocessing), so the active-learning queue
(a temp SQLite file) is never written and what is measured is inference + gateway, not the queue. Responses
that were nonetheless queued are counted.

Two built-in models (``--backbone``), each exported once by the project's own pipeline into --cache and
reused on later runs:

* ``lenet5`` (default)  the digits demo: LeNet-5, input [1,1,28,28], ~0.15 ms per batch-1 call, so the
  gateway's gRPC overhead dominates every ratio
* ``resnet18_cifar``     a fused CIFAR ResNet-18 (input [1,3,32,32]) trained for 1 epoch on digits 0-7: the
  weights do not matter for a cost benchmark, the model is there for its realistic inference cost

The model's own ORT latency at batch 1 and batch 64 is measured once at start-up and shown in the report.

    python bench/serve_benchmark.py [--backbone lenet5|resnet18_cifar] [--repository DIR] [--duration S] [--out DIR]

Writes report.md and report.json to --out (default runs/bench/serve-report, or serve-report-<backbone> for a
backbone other than lenet5). Every process started here is stopped by PID on exit, error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from oodguard.clients.gateway_process import GatewayProcess, ServerProcess, environment

ROOT = Path(__file__).resolve().parents[1]
CONCURRENCIES = (1, 8, 64)
TARGETS = ("ort-direct", "grpc-floor", "grpc-floor-model", "triton-direct", "gateway-embedded", "gateway-triton", "gateway-embedded-nobatch",
           "gateway-embedded-flagged", "gateway-embedded-workers", "gateway-baseline", "gateway-baseline-flagged")
#: the targets sent the all-flagged traffic (every item queued before its answer)
FLAGGED_TARGETS = ("gateway-embedded-flagged", "gateway-baseline-flagged")
CLK_TCK = os.sysconf("SC_CLK_TCK")
BACKBONES = ("lenet5", "resnet18_cifar")
#: model name of the resnet18_cifar repository (the lenet5 one is the demo's "digits")
RESNET_MODEL = "digits_resnet18"
RESNET_EPOCHS = 1
KNOWN_CLASSES = list(range(8))
LATENCY_BATCHES = (1, 64)
BUILD_FILE = "build.json"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", choices=BACKBONES, default="lenet5",
                        help="model to build and drive when --repository is not given: lenet5 (the digits demo, "
                        "default) or resnet18_cifar (a fused CIFAR ResNet-18 on digits 0-7, input 3x32x32, trained "
                        "1 epoch: only its cost matters here); exported once into --cache and reused")
    parser.add_argument("--repository", type=Path, help="model repository (default: the --backbone model, exported "
                        "once into --cache and reused)")
    parser.add_argument("--model", help="model to drive (default: the repository's only/first model)")
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds per cell (default 5)")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each cell (default 1)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds over all cells; the report gives "
                        "the median of the rounds per cell (default 2)")
    parser.add_argument("--concurrency", default=",".join(map(str, CONCURRENCIES)), help="comma-separated (default 1,8,64)")
    parser.add_argument("--targets", default=",".join(TARGETS), help="comma-separated subset of " + ",".join(TARGETS))
    parser.add_argument("--out", type=Path, default=None, help="report folder (default runs/bench/serve-report, "
                        "or runs/bench/serve-report-<backbone> for a backbone other than lenet5)")
    parser.add_argument("--cache", type=Path, default=ROOT / "runs" / "bench" / "serve-cache")
    parser.add_argument("--max-wait-ms", type=float, default=None, help="gateway-embedded micro-batching window "
                        "(default: the gateway's default)")
    parser.add_argument("--channels", type=int, default=8, help="gRPC channels (connections) per gateway target, "
                        "each with its own connection; concurrent callers take them in turn (default 8): one "
                        "connection reaches one worker of a --workers gateway")
    parser.add_argument("--workers", type=int, default=2, help="--workers of the gateway-embedded-workers target "
                        "(default 2)")
    parser.add_argument("--baseline-src", type=Path, default=None, help="folder holding an `oodguard` package (e.g. "
                        "the last commit's source laid out as installed): the gateway-baseline target runs `oodguard "
                        "serve` from it with gateway-embedded's flags (default: none, target skipped)")
    parser.add_argument("--hold", type=float, default=0.0, help=argparse.SUPPRESS)  # seconds to keep servers up at the end (profiling)
    args = parser.parse_args(argv)
    if args.out is None:
        name = "serve-report" if args.backbone == "lenet5" else f"serve-report-{args.backbone}"
        args.out = ROOT / "runs" / "bench" / name
    return args


# -- model and traffic ------------------------------------------------------------------------------
def cache_root(args) -> Path:
    """Where --backbone's repository (``repository/``) and training run (``train/``) are cached: --cache itself
    for lenet5 (the layout before --backbone existed), --cache/<backbone> otherwise."""
    return args.cache if args.backbone == "lenet5" else args.cache / args.backbone


def _has_version(repository: Path) -> bool:
    from oodguard import repository as repo

    return repository.is_dir() and any(repo.versions(repository, m) for m in repo.models(repository))


def ensure_repository(args) -> Path:
    if args.repository:
        return args.repository.resolve()
    root = cache_root(args)
    target = root / "repository"
    if _has_version(target):
        log(f"reusing the {args.backbone} repository {target}")
        return target.resolve()
    if args.backbone == "lenet5":
        from oodguard.export.demo import run_demo

        log(f"exporting the digits demo model into {target} (once; reused next time)")
        shutil.rmtree(target, ignore_errors=True)
        began = time.perf_counter()
        run_demo(target, work_dir=root / "train", progress=lambda line: None)
        _save_build(root, {"backbone": "lenet5", "model": "digits", "seconds": {"total": time.perf_counter() - began}})
        return target.resolve()
    return build_resnet18_repository(root).resolve()


def build_resnet18_repository(root: Path) -> Path:
    """Train (1 epoch) and export a fused CIFAR ResNet-18 on digits 0-7 into ``root/repository``.

    Built in ``root/.repository-building`` and renamed when complete, so an interrupted build is never
    mistaken for a cached one. The build times go to ``root/build.json`` (shown in later reports)."""
    from oodguard.export.pipeline import export_model
    from oodguard.export.spec import spec_from_training
    from oodguard.export.training_job import CHECKPOINT_FILE, run_training

    target, staging, work = root / "repository", root / ".repository-building", root / "train"
    log(f"building the resnet18_cifar repository in {target} (once; reused next time): train {RESNET_EPOCHS} "
        "epoch on digits 0-7 (resized to 3x32x32), then export the fused model (bank, scores, ONNX, calibration)")
    for path in (target, staging, work):
        shutil.rmtree(path, ignore_errors=True)
    began = time.perf_counter()
    run_training(backbone="resnet18_cifar", data="digits", out_dir=work, classes=KNOWN_CLASSES, epochs=RESNET_EPOCHS,
                 seed=0, holdout=0.4, progress=lambda line: log(f"  train: {line}"))
    trained = time.perf_counter()
    log(f"trained in {trained - began:.1f}s; exporting")
    result = export_model(spec_from_training(work / CHECKPOINT_FILE, staging, RESNET_MODEL),
                          progress=lambda line: log(f"  export: {line.strip()}"))
    exported = time.perf_counter()
    staging.rename(target)
    seconds = {"train": trained - began, "export": exported - trained, "total": exported - began,
               "export_steps": result.seconds}
    _save_build(root, {"backbone": "resnet18_cifar", "model": RESNET_MODEL, "epochs": RESNET_EPOCHS, "seconds": seconds})
    log(f"built the resnet18_cifar repository in {exported - began:.1f}s (train {seconds['train']:.1f}s, "
        f"export {seconds['export']:.1f}s)")
    return target


def _save_build(root: Path, info: dict) -> None:
    info = {**info, "built": time.strftime("%Y-%m-%d %H:%M:%S")}
    (root / BUILD_FILE).write_text(json.dumps(info, indent=1) + "\n")


def load_build(args) -> dict | None:
    """How the cached --backbone repository was built (None with --repository, or for a cache older than this)."""
    if args.repository:
        return None
    try:
        return json.loads((cache_root(args) / BUILD_FILE).read_text())
    except (OSError, ValueError):
        return None


@dataclass
class Traffic:
    model: str
    version: int
    inputs: np.ndarray  # [N,C,H,W] float32 (the version's preprocessing), unflagged in-distribution digits
    flagged_share: float  # share of the candidate digits the model flags (left out of the traffic)
    decision_score: str
    max_batch: int
    backbone: str = ""  # as recorded in calibration.json (a factory reference)
    #: [M,C,H,W] float32 inputs the model flags (uniform noise, preprocessed): the all-flagged traffic
    flagged_inputs: np.ndarray | None = None

    @property
    def request_shape(self) -> list[int]:
        """Shape of one batch-1 request: ``[1, C, H, W]``."""
        return [1, *self.inputs.shape[1:]]

    def request(self, i: int, flagged: bool = False):
        """The gateway's ``PredictRequest`` of input ``i`` (of the flagged inputs with ``flagged``): a float32
        batch-1 tensor, request id ``bench-<i>`` (a gateway call gives each send an id of its own)."""
        from oodguard.serve.v1 import oodguard_pb2 as pb

        x = (self.flagged_inputs if flagged else self.inputs)[i]
        return pb.PredictRequest(model=self.model, request_id=f"bench-{i}", tensor=pb.Tensor(
            dtype="float32", shape=self.request_shape, data=x.astype("<f4").tobytes()))

    @property
    def backbone_name(self) -> str:
        """``resnet18_cifar`` for the builtin ``oodguard.export.backbones:resnet18_cifar``; other references as they are."""
        return self.backbone.removeprefix("oodguard.export.backbones:")


def build_traffic(repository: Path, model: str | None, count: int = 256) -> Traffic:
    from oodguard import repository as repo
    from oodguard.calibration import Calibration
    from oodguard.datasets import load_dataset
    from oodguard.onnx_runner import OnnxModel
    from oodguard.preprocess import Preprocessing

    model = model or repo.models(repository)[0]
    version = repo.versions(repository, model)[-1]
    folder = repo.version_dir(repository, model, version)
    calibration = Calibration.load(folder / repo.CALIBRATION_FILE)
    prep = Preprocessing.from_dict(calibration.model["preprocessing"])
    declared = calibration.model.get("input", {}).get("shape")
    if declared is not None and tuple(declared) != prep.input_shape:
        raise ValueError(f"{folder}: calibration.json declares input {declared} but its preprocessing makes "
                         f"{list(prep.input_shape)}")
    digits = load_dataset("digits").select_classes(KNOWN_CLASSES)
    x = prep.apply(digits.images)  # [N, *prep.input_shape]
    outputs = OnnxModel(folder / repo.MODEL_FILE).run(x)
    score = "fused" if "fused" in calibration.thresholds else "sisome"  # the gateway's default decision
    threshold = calibration.thresholds[score].threshold
    flagged = calibration.thresholds[score].is_ood(outputs[score])
    # keep a margin below the threshold so batch-size-dependent rounding cannot flip a decision
    near = outputs[score] > threshold - 0.02 * abs(threshold) - 1e-6
    keep = np.flatnonzero(~flagged & ~near)[:count]
    if not len(keep):
        raise RuntimeError(f"{model} v{version} flags (or nearly flags) every candidate digit: no traffic to send")
    # all-flagged traffic: uniform noise images, kept where the model flags them with the same margin
    noise = prep.apply(np.random.default_rng(0).integers(0, 256, size=(4 * count, *digits.images.shape[1:]),
                                                         dtype=np.uint8))
    noise_scores = OnnxModel(folder / repo.MODEL_FILE).run(noise)[score]
    sure = calibration.thresholds[score].is_ood(noise_scores) & (noise_scores > threshold + 0.02 * abs(threshold) + 1e-6)
    flagged_inputs = np.ascontiguousarray(noise[np.flatnonzero(sure)[:count]]) if sure.any() else None
    return Traffic(model, version, np.ascontiguousarray(x[keep]), float(flagged.mean()), score,
                   int(calibration.model.get("max_batch_size", 64)), str(calibration.model.get("backbone", "")),
                   flagged_inputs)


def model_latency(session, inputs: np.ndarray, batches=LATENCY_BATCHES, runs: int = 5,
                  min_run_s: float = 0.05) -> dict[int, dict]:
    """ORT latency of one ``session.run`` per batch size: ``runs`` interleaved runs (batch 1, batch 64, batch 1,
    ...), each the mean over enough back-to-back calls to last ``min_run_s``; the median of the runs is reported,
    with the best run (the least disturbed by other load on a shared machine). Rows are the traffic's inputs
    (repeated to fill a batch)."""
    from oodguard import repository as repo

    feeds = {b: {repo.INPUT_NAME: np.ascontiguousarray(inputs[np.arange(b) % len(inputs)])} for b in batches}
    calls = {}
    for b, feed in feeds.items():  # warm-up, and how many calls make one run
        session.run(None, feed)
        t0 = time.perf_counter()
        session.run(None, feed)
        calls[b] = max(1, int(min_run_s / max(time.perf_counter() - t0, 1e-6)))
    per_run = {b: [] for b in batches}
    for _ in range(runs):
        for b, feed in feeds.items():
            t0 = time.perf_counter()
            for _ in range(calls[b]):
                session.run(None, feed)
            per_run[b].append((time.perf_counter() - t0) / calls[b] * 1000.0)
    return {b: {"ms": float(np.median(ms)), "per_sample_ms": float(np.median(ms)) / b, "min_ms": float(min(ms)),
                "runs_ms": ms, "calls_per_run": calls[b]} for b, ms in per_run.items()}


# -- processes --------------------------------------------------------------------------------------
def _load_integration_helpers():
    """oodguard.triton_local: TritonInstall / TritonServer / free_ports (one start logic for tests and bench)."""
    from oodguard import triton_local

    return triton_local


def group_cpu_seconds(pgid: int) -> float:
    """user+system CPU seconds of every live process in process group ``pgid``."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # fields[0] is field 3 (state); pgrp is field 5
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / CLK_TCK


def start_gateway(name: str, repository: Path, work: Path, port: int, extra: list[str],
                  source: Path | None = None) -> GatewayProcess:
    """``oodguard serve`` as a subprocess in a new session (its process group is the gateway and its workers), not
    yet waited for (:meth:`GatewayProcess.wait_ready`); ``source``: a folder holding another ``oodguard`` package
    to run instead of this checkout's."""
    # only the flags below count (OODGUARD_* settings of the calling shell would make runs incomparable); a
    # ``source`` on PYTHONPATH is found before the editable install of this checkout
    env = environment() if source is None else environment(PYTHONPATH=str(source.resolve()))
    return GatewayProcess(repository, ["--queue-path", work / f"{name}-queue.sqlite", "--drain-timeout-s", "1",
                                       "--log-level", "WARNING", *extra],
                          work=work, name=name, port=port, env=env).start(wait=False)


def start_floor_server(port: int, response: Path, work: Path, model: Path | None = None) -> ServerProcess:
    """``bench/grpc_floor_server.py`` answering ``response`` (a serialized PredictResponse) on ``port``; with
    ``model``, after running each request's tensor through it (the ``grpc-floor-model`` target). Not yet waited
    for (:meth:`ServerProcess.wait_ready`)."""
    name = "grpc-floor" if model is None else "grpc-floor-model"
    command = [sys.executable, ROOT / "bench" / "grpc_floor_server.py", "--listen", f"127.0.0.1:{port}",
               "--response", response, *([] if model is None else ["--model", model])]
    return ServerProcess(command, name=name, port=port, log_path=work / f"{name}.log", cwd=work).start(wait=False)


def capture_response(gw: ServerProcess, traffic: Traffic, path: Path) -> Path:
    """The gateway's answer to the first traffic request, serialized to ``path`` (what grpc-floor answers)."""
    import grpc

    from oodguard.serve.v1 import oodguard_pb2_grpc as pb_grpc

    with grpc.insecure_channel(gw.target) as channel:
        path.write_bytes(pb_grpc.OODGuardStub(channel).Predict(traffic.request(0), timeout=30).SerializeToString())
    return path


# -- load generation --------------------------------------------------------------------------------
@dataclass
class Cell:
    target: str
    concurrency: int
    round: int
    requests: int
    errors: int
    throughput_rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    server_cpu_pct: float | None  # % of one core, server process group(s), over the measured window
    client_cpu_pct: float  # % of one core, this process (load generator; ORT itself for ort-direct)
    queued: int = 0
    first_error: str = ""
    #: server CPU milliseconds per answered request (warm-up and measured window together; None: not measured)
    cpu_ms_per_request: float | None = None
    loadavg: float | None = None  # 1-minute load average when the cell ended
    #: as cpu_ms_per_request, the gateway's own process group alone (gateway-triton: tritonserver left out)
    gateway_cpu_ms_per_request: float | None = None


@dataclass
class Window:
    warm_end: float
    end: float
    latencies: list = field(default_factory=list)
    errors: int = 0
    queued: int = 0
    first_error: str = ""
    answered: int = 0  # requests answered over warm-up and measured window (what the server CPU is divided by)

    def record(self, t0: float, t1: float, error: BaseException | None = None) -> None:
        if error is None:
            self.answered += 1
        if self.warm_end <= t1 <= self.end:
            if error is None:
                self.latencies.append(t1 - t0)
            else:
                self.errors += 1
                self.first_error = self.first_error or f"{type(error).__name__}: {error}"[:300]


def summarise(target: str, concurrency: int, rnd: int, w: Window, duration: float, server_cpu: float | None,
              client_cpu: float, server_cpu_total: float | None = None) -> Cell:
    """``server_cpu`` / ``client_cpu``: CPU seconds scaled to the measured window; ``server_cpu_total``: the server's
    CPU seconds over warm-up and measured window, divided by every request answered in that span."""
    lat = np.asarray(w.latencies) * 1000.0
    pct = (lambda q: float(np.percentile(lat, q))) if len(lat) else (lambda q: float("nan"))
    per_request = None if server_cpu_total is None or not w.answered else 1000.0 * server_cpu_total / w.answered
    return Cell(target, concurrency, rnd, len(lat), w.errors, len(lat) / duration, pct(50), pct(90), pct(99),
                float(lat.mean()) if len(lat) else float("nan"),
                None if server_cpu is None else 100.0 * server_cpu / duration, 100.0 * client_cpu / duration,
                w.queued, w.first_error, per_request, os.getloadavg()[0])


async def drive_async(call, concurrency: int, warmup: float, duration: float, n_inputs: int) -> Window:
    start = time.perf_counter()
    w = Window(start + warmup, start + warmup + duration)

    async def worker(k: int) -> None:
        i = k
        while True:
            t0 = time.perf_counter()
            if t0 >= w.end:
                return
            try:
                await call(i % n_inputs, w)
                w.record(t0, time.perf_counter())
            except Exception as exc:  # noqa: BLE001 - counted and reported
                w.record(t0, time.perf_counter(), exc)
                await asyncio.sleep(0.01)
            i += concurrency

    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    return w


def drive_threads(call, concurrency: int, warmup: float, duration: float, n_inputs: int) -> Window:
    start = time.perf_counter()
    w = Window(start + warmup, start + warmup + duration)
    lock = threading.Lock()

    def worker(k: int) -> None:
        i, local = k, []
        while True:
            t0 = time.perf_counter()
            if t0 >= w.end:
                break
            try:
                call(i % n_inputs)
                local.append((t0, time.perf_counter(), None))
            except Exception as exc:  # noqa: BLE001
                local.append((t0, time.perf_counter(), exc))
            i += concurrency
        with lock:
            for t0, t1, exc in local:
                w.record(t0, t1, exc)

    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return w


class Drivers:
    """One client per target, built once and reused by every cell."""

    def __init__(self, traffic: Traffic, repository: Path, channels: int = 1):
        self.traffic = traffic
        self.n_channels = channels
        self.repository = repository
        self.gateway_requests = {}
        self.channels = {}
        self.triton_client = None
        self.ort = None

    # ort-direct
    def ort_call(self):
        from oodguard import repository as repo
        from oodguard.onnx_runner import OnnxModel

        if self.ort is None:
            self.ort = OnnxModel(repo.version_dir(self.repository, self.traffic.model, self.traffic.version) / repo.MODEL_FILE)
        shape = self.traffic.request_shape
        session, rows = self.ort.session, [x.reshape(shape) for x in self.traffic.inputs]
        return lambda i: session.run(None, {repo.INPUT_NAME: rows[i]})

    # gateways
    def gateway_call(self, target: str, flagged: bool = False):
        """Predict calls to ``target`` with the unflagged traffic (``flagged``: the all-flagged traffic)."""
        import grpc

        from oodguard.serve.v1 import oodguard_pb2 as pb
        from oodguard.serve.v1 import oodguard_pb2_grpc as pb_grpc

        if flagged not in self.gateway_requests:
            n = len(self.traffic.flagged_inputs if flagged else self.traffic.inputs)
            self.gateway_requests[flagged] = [self.traffic.request(i, flagged) for i in range(n)]
        if target not in self.channels:  # local subchannel pools: equal channels would share one connection
            self.channels[target] = [grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
                                     for _ in range(self.n_channels)]
        stubs = [pb_grpc.OODGuardStub(channel) for channel in self.channels[target]]
        requests, queued = self.gateway_requests[flagged], pb.QUEUED
        sent = itertools.count()

        async def call(i: int, w: Window) -> None:
            # a request id of its own per call: the gateway answers a repeated (request id, input) from the ids it
            # stored for the first (a retry), which would skip the queue writes this measures
            request = pb.PredictRequest()
            request.CopyFrom(requests[i])
            request.request_id = f"bench-{next(sent)}"
            # by input index: at c=64 caller k always gets channel k % channels; at c=1 the calls rotate over them
            response = await stubs[i % len(stubs)].Predict(request, timeout=30)
            if response.predictions[0].queue_status == queued:
                w.queued += 1
        return call

    # triton-direct
    def triton_call(self, url: str):
        import tritonclient.grpc.aio as grpcclient

        from oodguard import repository as repo

        if self.triton_client is None:
            self.triton_client = grpcclient.InferenceServerClient(url)
        client, model = self.triton_client, self.traffic.model
        inputs = []
        shape = self.traffic.request_shape
        for x in self.traffic.inputs:
            tensor = grpcclient.InferInput(repo.INPUT_NAME, shape, "FP32")
            tensor.set_data_from_numpy(x.reshape(shape))
            inputs.append(tensor)

        async def call(i: int, w: Window) -> None:
            result = await client.infer(model, [inputs[i]], client_timeout=30)
            # decode every output, as the gateway's Triton backend does
            for output in result.get_response().outputs:
                result.as_numpy(output.name)
        return call

    async def aclose(self) -> None:
        for channels in self.channels.values():
            for channel in channels:
                await channel.close()
        if self.triton_client is not None:
            await self.triton_client.close()


# -- report -----------------------------------------------------------------------------------------
def aggregate(cells: list[Cell]) -> dict[tuple[str, int], dict]:
    """Per (target, concurrency): medians over rounds (one round: the cell itself)."""
    out = {}
    for key in sorted({(c.target, c.concurrency) for c in cells}, key=lambda k: (TARGETS.index(k[0]), k[1])):
        group = [c for c in cells if (c.target, c.concurrency) == key]
        med = lambda name: float(np.median([getattr(c, name) for c in group]))  # noqa: E731
        server = [c.server_cpu_pct for c in group if c.server_cpu_pct is not None]
        per_request = [c.cpu_ms_per_request for c in group if c.cpu_ms_per_request is not None]
        out[key] = {"target": key[0], "concurrency": key[1], "rounds": len(group), "requests": sum(c.requests for c in group),
                    "errors": sum(c.errors for c in group), "queued": sum(c.queued for c in group),
                    "throughput_rps": med("throughput_rps"), "p50_ms": med("p50_ms"), "p90_ms": med("p90_ms"),
                    "p99_ms": med("p99_ms"), "mean_ms": med("mean_ms"),
                    "server_cpu_pct": float(np.median(server)) if server else None, "client_cpu_pct": med("client_cpu_pct"),
                    "cpu_ms_per_request": float(np.median(per_request)) if per_request else None}
    return out


def model_cpu_ms(path: Path, x: np.ndarray, calls: int = 2000) -> float:
    """CPU milliseconds of one batch-1 run of the model on a 1-thread, non-spinning session: what the gateway's
    embedded backend runs for a model as small as the digits LeNet (on its event loop), so the part of the
    gateway's CPU per request that is the model itself."""
    from oodguard import repository as repo
    from oodguard.onnx_runner import OnnxModel

    session = OnnxModel(path, intra_op_threads=1, spin=False).session
    feed = {repo.INPUT_NAME: np.ascontiguousarray(x[:1])}
    session.run(None, feed)
    began = time.process_time()
    for _ in range(calls):
        session.run(None, feed)
    return (time.process_time() - began) / calls * 1000.0


def ratios(cells: list[Cell], model_cpu: float | None = None) -> list[dict]:
    """Every ratio (or difference) is computed per round from that round's two cells, which ran back to back
    and so saw the same state of a shared, noisy machine, and reported as the median over the rounds that have
    both (``per_round`` lists them). A missing, failed or zero-throughput cell gives no value for its round."""
    by_key = {(c.target, c.concurrency, c.round): c for c in cells}
    rounds = sorted({c.round for c in cells})

    def metric(target, c, name, rnd):
        cell = by_key.get((target, c, rnd))
        value = None if cell is None else getattr(cell, name)
        return None if value is None or np.isnan(value) else value

    def measured(pairs, c, combine):  # pairs: (target, metric name) each; one value per round that has them all
        values = []
        for r in rounds:
            found = [metric(t, c, name, r) for t, name in pairs]
            value = None if None in found else combine(*found)
            if value is not None:
                values.append(value)
        return values

    def paired(targets, c, name, combine):
        return measured([(t, name) for t in targets], c, combine)

    def diff(a, b):  # p50 of target a - p50 of target b at concurrency 1
        return paired([a, b], 1, "p50_ms", lambda x, y: x - y)

    def ratio(a, b, c=64, name="throughput_rps"):  # (default) throughput of a / throughput of b at concurrency 64
        return paired([a, b], c, name, lambda x, y: None if y == 0 else x / y)

    def entry(name, per_round, unit, target, ok, how):
        """``ok=None``: an informative row (no target)."""
        value = float(np.median(per_round)) if per_round else None
        return {"name": name, "value": value, "per_round": per_round, "unit": unit, "target": target,
                "met": None if value is None or ok is None else bool(ok(value)), "how": how}

    return [
        entry("gateway-triton p50 overhead @c=1", diff("gateway-triton", "triton-direct"),
              "ms", "<= 1 ms", lambda v: v <= 1.0, "gateway-triton p50 - triton-direct p50"),
        entry("gateway-embedded p50 overhead @c=1", diff("gateway-embedded", "ort-direct"),
              "ms", "<= 1 ms", lambda v: v <= 1.0, "gateway-embedded p50 - ort-direct p50 (micro-batching on, default window)"),
        entry("gateway-embedded (micro-batching off) p50 overhead @c=1",
              diff("gateway-embedded-nobatch", "ort-direct"),
              "ms", "<= 1 ms (info)", lambda v: v <= 1.0, "gateway-embedded-nobatch p50 - ort-direct p50"),
        entry("throughput gateway-triton / triton-direct @c=64",
              ratio("gateway-triton", "triton-direct"),
              "x", ">= 0.80", lambda v: v >= 0.8, "requests/s ratio"),
        entry("throughput gateway-embedded micro-batching on / off @c=64",
              ratio("gateway-embedded", "gateway-embedded-nobatch"),
              "x", ">= 2.0", lambda v: v >= 2.0, "requests/s ratio"),
        entry("gRPC round trip alone @c=1", paired(["grpc-floor"], 1, "p50_ms", lambda x: x),
              "ms", "(info)", None, "grpc-floor p50: a Python gRPC call that does no work, the transport's share of "
              "the embedded overhead"),
        entry("gateway-embedded own work @c=1",
              paired(["gateway-embedded", "grpc-floor", "ort-direct"], 1, "p50_ms", lambda g, f, o: g - f - o),
              "ms", "(info)", None, "gateway-embedded p50 - grpc-floor p50 - ort-direct p50: the rest of the embedded "
              "overhead (validation, decision, answer, and the model call's cost in the gateway beyond its cost direct)"),
        entry("throughput grpc-floor / triton-direct @c=64",
              ratio("grpc-floor", "triton-direct"),
              "x", "(info)", None, "requests/s ratio: the most a single-process Python gRPC front reaches here"),
        *(entry(f"CPU per request gateway-embedded / grpc-floor @c={c}",
                ratio("gateway-embedded", "grpc-floor", c, "cpu_ms_per_request"), "x", "<= 1.5",
                lambda v: v <= 1.5, "server CPU ms per answered request, gateway process tree over the floor's")
          for c in (1, 64)),
        entry("CPU per request grpc-floor-model / grpc-floor @c=1",
              ratio("grpc-floor-model", "grpc-floor", 1, "cpu_ms_per_request"), "x", "(info)", None,
              "the floor plus one inline batch-1 model run per request over the floor: what the model costs in a "
              "serving loop (its runs come between idle gaps, colder than back to back), the gateway's work left out"),
        *(entry(f"CPU per request gateway-embedded / grpc-floor-model @c={c}",
                ratio("gateway-embedded", "grpc-floor-model", c, "cpu_ms_per_request"), "x", "(info)", None,
                "gateway CPU ms per request over the floor-with-model's: what the gateway's own work (validation, "
                "batching, decision, metrics, reply) adds to transport and model")
          for c in (1, 64)),
        entry("CPU per request gateway-embedded less the model / grpc-floor @c=1",
              [] if model_cpu is None else paired(["gateway-embedded", "grpc-floor"], 1, "cpu_ms_per_request",
                                                  lambda g, f: (g - model_cpu) / f),
              "x", "<= 1.5", lambda v: v <= 1.5, "(gateway CPU ms per request - the model's own CPU ms per batch-1 "
              "run, 1 thread) / the floor's: the gateway's transport and work, the model left out"),
        entry("throughput all-flagged / unflagged @c=64", ratio("gateway-embedded-flagged", "gateway-embedded"),
              "x", ">= 0.70", lambda v: v >= 0.7, "requests/s of gateway-embedded-flagged (every item queued in "
              "SQLite before its answer) over gateway-embedded (nothing queued)"),
        *(entry(f"CPU per request gateway-triton's gateway alone / grpc-floor @c={c}",
                measured([("gateway-triton", "gateway_cpu_ms_per_request"), ("grpc-floor", "cpu_ms_per_request")], c,
                         lambda g, f: None if f == 0 else g / f), "x", "<= 1.5", lambda v: v <= 1.5,
                "CPU ms per request of the gateway's process group in front of Triton (the model runs in "
                "tritonserver, left out) over the floor's") for c in (1, 64)),
        entry("CPU per request all-flagged / unflagged @c=64",
              ratio("gateway-embedded-flagged", "gateway-embedded", 64, "cpu_ms_per_request"), "x", "(info)", None,
              "what the queue writes cost in gateway CPU"),
        entry("throughput --workers N / --workers 1 @c=64", ratio("gateway-embedded-workers", "gateway-embedded"),
              "x", ">= 1.3 (2 cores)", lambda v: v >= 1.3, "requests/s of gateway-embedded-workers over "
              "gateway-embedded, the load generator on the same cores"),
        entry("load generator CPU @c=64 (gateway-embedded-workers cells)",
              paired(["gateway-embedded-workers"], 64, "client_cpu_pct", lambda x: x), "%", "(info)", None,
              "this process's CPU in % of one core while it drove the workers"),
        entry("p50 gateway-embedded / gateway-baseline @c=1", ratio("gateway-embedded", "gateway-baseline", 1, "p50_ms"),
              "x", "<= 1.05", lambda v: v <= 1.05, "no latency regression against the --baseline-src code"),
        *(entry(f"CPU per request gateway-embedded / gateway-baseline @c={c}",
                ratio("gateway-embedded", "gateway-baseline", c, "cpu_ms_per_request"), "x", "(info)", None,
                "server CPU ms per request against the --baseline-src code") for c in (1, 64)),
        entry("throughput all-flagged gateway-embedded-flagged / gateway-baseline-flagged @c=64",
              ratio("gateway-embedded-flagged", "gateway-baseline-flagged"), "x", "(info)", None,
              "requests/s on the all-flagged traffic against the --baseline-src code"),
        entry("CPU per request all-flagged gateway-embedded-flagged / gateway-baseline-flagged @c=64",
              ratio("gateway-embedded-flagged", "gateway-baseline-flagged", 64, "cpu_ms_per_request"), "x", "(info)",
              None, "server CPU ms per all-flagged request against the --baseline-src code"),
    ]


def fmt(v, spec=".2f"):
    return "n/a" if v is None or (isinstance(v, float) and np.isnan(v)) else format(v, spec)


def write_report(out: Path, meta: dict, cells: list[Cell], agg: dict, rat: list[dict]) -> str:
    out.mkdir(parents=True, exist_ok=True)
    table = ["| target | conc | req/s | p50 ms | p90 ms | p99 ms | errors | queued | server CPU % | server CPU ms/req "
             "| client CPU % |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in agg.values():
        table.append(f"| {row['target']} | {row['concurrency']} | {fmt(row['throughput_rps'], '.0f')} | {fmt(row['p50_ms'])} | "
                     f"{fmt(row['p90_ms'])} | {fmt(row['p99_ms'])} | {row['errors']} | {row['queued']} | "
                     f"{fmt(row['server_cpu_pct'], '.0f')} | {fmt(row.get('cpu_ms_per_request'), '.3f')} | "
                     f"{fmt(row['client_cpu_pct'], '.0f')} |")
    lines = ["| ratio | value | per round | target | met |", "|---|---:|---|---|---|"]
    suffix = {"ms": " ms", "%": "%"}
    for r in rat:
        value = fmt(r["value"], ".2f") + ("" if r["value"] is None else suffix.get(r["unit"], "x"))
        per_round = ", ".join(fmt(v, ".2f") for v in r.get("per_round", [])) or "n/a"
        lines.append(f"| {r['name']} ({r['how']}) | {value} | {per_round} | {r['target']} | "
                     f"{'n/a' if r['met'] is None else 'yes' if r['met'] else 'NO'} |")
    shape = "[" + ",".join(map(str, meta["request_shape"])) + "]"
    md = "\n".join([
        "# Serving benchmark", "",
        f"{meta['started']} on {meta['machine']}; run time {meta['run_time_s']:.0f} s. Model {meta['model']} v{meta['version']} "
        f"(backbone `{meta['backbone']}`, input {shape}) from `{meta['repository']}`.", "",
        model_cost_paragraph(meta) + (f" Its CPU per batch-1 run on a 1-thread session (the gateway's for a model this "
                                      f"small): {meta['model_cpu_ms']:.3f} ms." if meta.get("model_cpu_ms") else ""), "",
        f"Closed loop, batch 1 per request, {meta['duration_s']:.1f} s measured per cell after {meta['warmup_s']:.1f} s warm-up, "
        f"{meta['rounds']} round(s), cells interleaved (every target in turn per concurrency). Loopback only; gateways "
        "are `oodguard serve` subprocesses; the load generator (asyncio `grpc.aio` / `tritonclient.grpc.aio`; a thread "
        "pool for ort-direct) is this process and shares the machine's CPU cores with the servers.", "",
        f"Traffic: {meta['traffic_inputs']} in-distribution digits (0-7) that the model does not flag with "
        f"`{meta['decision_score']}` ({100 * meta['flagged_share']:.1f}% of the candidates were flagged and left out), sent "
        f"to the gateways as preprocessed float32 {shape} tensors, so the SQLite query queue (a temp file) is not "
        "written: the `queued` column counts responses that were queued anyway. Server CPU % is the server process "
        "group's CPU over the measured window in % of one core (gateway-triton: gateway + tritonserver); client CPU % is "
        "this process (for ort-direct it includes the inference itself). Server CPU ms/req is the server process "
        "group's CPU over warm-up and measured window divided by the requests answered in that span (read from "
        "/proc: it holds on a busy machine, where throughput does not).", "",
        f"gateway-embedded-flagged: {meta.get('flagged_inputs', 0)} uniform-noise inputs the model flags, so every "
        f"request writes its record to the SQLite queue before it is answered; gateway-embedded-workers: "
        f"`--workers {meta.get('workers', 2)}`; gateway-baseline: the code in `{meta.get('baseline_src')}` with "
        "gateway-embedded's flags (gateway-baseline-flagged: the same, sent the all-flagged traffic). "
        "1-minute load average at start / end: "
        + " / ".join(", ".join(f"{v:.2f}" for v in meta[k]) if meta.get(k) else "n/a"
                     for k in ("loadavg_start", "loadavg_end")) + " (per cell: report.json).", "",
        f"Gateway-embedded: micro-batching at {meta['embedded_batching']}; gateway-embedded-nobatch: `--max-batch 1` "
        "(each request runs alone; the wait window never applies). Triton: `--model-config-name=cpu` (python backend "
        "running the same model.onnx with ONNX Runtime, 1 intra-op thread, dynamic batching up to 64, 500 us queue delay). "
        "grpc-floor: `bench/grpc_floor_server.py`, a `grpc.aio` server answering every Predict with one response captured "
        "from a gateway, no work: the Python gRPC round trip alone, so the embedded overhead splits into transport "
        "(grpc-floor) and the gateway's own work (gateway-embedded - grpc-floor - ort-direct). grpc-floor-model: the "
        "same server running each request's tensor through the model first (inline, one-thread session, as the "
        "gateway's embedded backend for a small model): transport plus the model as served.",
        "", "## Results", "", *table, "",
        "## Ratios (this run)", "",
        "Each ratio is computed per round from the two cells of that round (run back to back, so they saw the same "
        "state of the machine); the value is the median over rounds.", "", *lines, "",
    ])
    if meta.get("notes"):
        md += "\n## Notes\n\n" + "\n".join(f"- {n}" for n in meta["notes"]) + "\n"
    (out / "report.md").write_text(md)
    (out / "report.json").write_text(json.dumps({"meta": meta, "summary": list(agg.values()), "ratios": rat,
                                                 "cells": [asdict(c) for c in cells]}, indent=1))
    return md


def model_cost_paragraph(meta: dict) -> str:
    """How heavy the model is on its own, to read the gateway overheads against."""
    lat = meta.get("model_latency_ms") or {}
    parts = [f"batch {b}: {fmt(v['ms'], '.2f')} ms per call ({fmt(v['per_sample_ms'], '.3f')} ms per sample; "
             f"best run {fmt(v.get('min_ms'), '.2f')} ms)" for b, v in sorted(lat.items(), key=lambda kv: int(kv[0]))]
    text = (f"Model cost: ONNX Runtime in this process, one session (the ort-direct one, default threads), measured "
            f"once at start-up before any cell, median of {meta.get('model_latency_runs', 'n/a')} interleaved runs: "
            + ("; ".join(parts) if parts else "n/a")
            + (f" (1-minute load average {meta['model_latency_loadavg']:.2f} on {meta.get('cpus', '?')} cores when it "
               "was measured: other load inflates these figures)" if meta.get("model_latency_loadavg") is not None else "")
            + ". A gateway overhead in the ratios below is to be read against "
            "the batch-1 figure: where it is a small fraction of a millisecond the gateway dominates every ratio.")
    build = meta.get("build")
    if build and build.get("backbone") == "resnet18_cifar":
        sec = build.get("seconds", {})
        text += (f" The {build['backbone']} weights come from {build.get('epochs', 1)} epoch of training on digits 0-7 "
                 "(inputs resized to 3x32x32): they do not matter for a cost benchmark (the graph and its cost are "
                 f"those of any trained CIFAR ResNet-18 with the fused OOD head); the repository was built on "
                 f"{build.get('built', '?')} in {fmt(sec.get('total'), '.0f')} s (train {fmt(sec.get('train'), '.0f')} s, "
                 f"export {fmt(sec.get('export'), '.0f')} s)"
                 + (", reused from the cache by this run." if build.get("reused") else ", by this run."))
    return text


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


# -- main ---------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    run = _plan(parse_args(argv))
    # SIGINT (even where a parent shell made it ignored) and SIGTERM → the same cleanup path as Ctrl-C
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    with ExitStack() as stack:
        run.stack = stack
        run.work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="oodguard-serve-bench-")))
        repository, build, traffic = _prepare_model(run)
        drivers = Drivers(traffic, repository, run.args.channels)
        cost = _measure_model_cost(drivers, repository, traffic)
        helpers = _load_integration_helpers()
        triton = _start_triton(run, helpers, repository)
        gateways, floor_port = _start_gateways(run, helpers, repository, traffic, triton)
        _start_floors(run, helpers, repository, traffic, gateways, floor_port)
        embedded_batching = _embedded_batching(run.args, repository, traffic)
        cells = _run_cells(run, traffic, drivers, gateways, triton)
        if run.args.hold:
            log(f"holding servers for {run.args.hold:.0f}s: "
                + ", ".join(f"{g.name} PID {g.process.pid}" for g in gateways.values()))
            time.sleep(run.args.hold)
        md = _write_outputs(run, repository, build, traffic, cost, embedded_batching, triton, gateways, cells)
    print(md)
    print(f"run time {time.monotonic() - run.began:.0f}s; report in {run.args.out}")
    return 0


@dataclass
class _Run:
    """One benchmark run's flags, start, cells to measure (``targets`` shrinks as targets are skipped), the notes
    for the report, and its work folder and cleanup stack (set once the ExitStack is open)."""

    args: argparse.Namespace
    began: float
    started: str
    loadavg_start: tuple
    concurrencies: list[int]
    targets: list[str]
    notes: list[str] = field(default_factory=list)
    stack: ExitStack | None = None
    work: Path | None = None

    def note(self, message: str) -> None:
        """Keep ``message`` for the report and log it."""
        self.notes.append(message)
        log(self.notes[-1])


def _plan(args) -> _Run:
    """The run from its flags: the start time and load, the concurrencies and targets (unknown targets refused)."""
    began, started = time.monotonic(), time.strftime("%Y-%m-%d %H:%M:%S")
    loadavg_start = os.getloadavg()
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    targets = [t for t in args.targets.split(",") if t]
    unknown = set(targets) - set(TARGETS)
    if unknown:
        raise SystemExit(f"unknown targets: {sorted(unknown)}")
    return _Run(args, began, started, loadavg_start, concurrencies, targets)


def _prepare_model(run: _Run):
    """The repository (exported, or reused from the cache), its build record and the traffic sent to every target."""
    args = run.args
    cached = args.repository is None and _has_version(cache_root(args) / "repository")
    repository = ensure_repository(args)
    build = load_build(args)
    if build is not None:
        build["reused"] = cached
    traffic = build_traffic(repository, args.model)
    log(f"model {traffic.model} v{traffic.version} ({traffic.backbone_name}, request {traffic.request_shape}); "
        f"traffic: {len(traffic.inputs)} unflagged ID digits ({100 * traffic.flagged_share:.1f}% of candidates "
        "flagged, left out)")
    if args.repository and args.backbone != "lenet5" and traffic.backbone_name != args.backbone:
        run.note(f"--backbone {args.backbone} ignored: --repository was given and its model's backbone is "
                 f"{traffic.backbone_name}")
    return repository, build, traffic


@dataclass
class _ModelCost:
    """The model's own latency per batch size (ORT, median of ``runs``, at load ``loadavg``) and CPU ms per batch-1 run:
    what the serving overheads are measured against."""

    latency: dict
    runs: int
    loadavg: float
    cpu_ms: float


def _measure_model_cost(drivers: Drivers, repository: Path, traffic: Traffic) -> _ModelCost:
    """Load the model once (for this and for ort-direct) and measure its latency and CPU cost alone."""
    from oodguard import repository as repo
    from oodguard.onnx_runner import OnnxModel

    # one session for the start-up latency and for ort-direct (the model is loaded once)
    drivers.ort = OnnxModel(repo.version_dir(repository, traffic.model, traffic.version) / repo.MODEL_FILE)
    latency_runs = 5
    latency = model_latency(drivers.ort.session, traffic.inputs, runs=latency_runs)
    latency_loadavg = os.getloadavg()[0]
    model_cpu = model_cpu_ms(repo.version_dir(repository, traffic.model, traffic.version) / repo.MODEL_FILE,
                             traffic.inputs)
    log(f"model CPU per batch-1 run (1 thread, no spinning): {model_cpu:.3f} ms")
    log("model latency (ORT, one session, median of interleaved runs): " + ", ".join(
        f"batch {b} {v['ms']:.2f} ms ({v['per_sample_ms']:.3f} ms/sample, best run {v['min_ms']:.2f} ms)"
        for b, v in latency.items()) + f"; load average {latency_loadavg:.2f}")
    return _ModelCost(latency, latency_runs, latency_loadavg, model_cpu)


def _start_triton(run: _Run, helpers, repository: Path):
    """tritonserver (CPU config) when a Triton target is chosen; None, and those targets skipped, when it is not
    installed."""
    if not {"triton-direct", "gateway-triton"} & set(run.targets):
        return None
    install = helpers.TritonInstall.find(helpers.triton_env_dir())
    if isinstance(install, str):
        run.note(f"Triton targets skipped: {install} (run `bash scripts/setup_triton.sh`)")
        run.targets = [t for t in run.targets if t not in ("triton-direct", "gateway-triton")]
        return None
    triton = helpers.TritonServer(install, repository, run.work / "tritonserver.log", poll_secs=5)
    run.stack.callback(triton.stop)
    log("starting tritonserver (CPU config)")
    triton.start()
    log(f"tritonserver ready on {triton.url} in {triton.started_in_s:.1f}s")
    return triton


def _start_gateways(run: _Run, helpers, repository: Path, traffic: Traffic,
                    triton) -> tuple[dict[str, ServerProcess], int]:
    """Every chosen gateway target started and SERVING (each on a port of its own, whether chosen or not), and the
    port kept for grpc-floor; targets that cannot run (no --baseline-src, nothing flagged) are skipped."""
    args = run.args
    gateways: dict[str, ServerProcess] = {}
    extra_embedded = [] if args.max_wait_ms is None else ["--max-wait-ms", str(args.max_wait_ms)]
    if args.baseline_src is None:
        run.targets = [t for t in run.targets if not t.startswith("gateway-baseline")]
    if set(FLAGGED_TARGETS) & set(run.targets) and traffic.flagged_inputs is None:
        run.note(f"{', '.join(t for t in FLAGGED_TARGETS if t in run.targets)} skipped: the model flags none of "
                 "the noise inputs")
        run.targets = [t for t in run.targets if t not in FLAGGED_TARGETS]
    specs = {"gateway-embedded": extra_embedded,
             "gateway-embedded-nobatch": ["--max-batch", "1"],
             "gateway-triton": ["--backend", "triton", "--triton-url", triton.url] if triton else None,
             "gateway-embedded-flagged": extra_embedded,
             "gateway-embedded-workers": [*extra_embedded, "--workers", str(args.workers)],
             "gateway-baseline": extra_embedded,
             "gateway-baseline-flagged": extra_embedded}
    ports = iter(helpers.free_ports(len(specs) + 1))
    for name, extra in specs.items():
        port = next(ports)
        if name not in run.targets:
            continue
        gw = start_gateway(name, repository, run.work, port, extra,
                           source=args.baseline_src if name.startswith("gateway-baseline") else None)
        run.stack.callback(gw.stop)
        gateways[name] = gw
    for gw in gateways.values():
        gw.wait_ready()
        log(f"{gw.name} SERVING on {gw.target} (PID {gw.process.pid})")
    return gateways, next(ports)


def _start_floors(run: _Run, helpers, repository: Path, traffic: Traffic, gateways: dict[str, ServerProcess],
                  floor_port: int) -> None:
    """The chosen grpc-floor servers (added to ``gateways``), answering a response captured from a gateway; skipped
    when no gateway runs."""
    from oodguard import repository as repo

    floor_ports = {"grpc-floor": floor_port, "grpc-floor-model": helpers.free_ports(1)[0]}
    floors = [t for t in ("grpc-floor", "grpc-floor-model") if t in run.targets]
    if floors and not gateways:
        run.note(f"{', '.join(floors)} skipped: they answer with a response captured from a gateway, and no "
                 "gateway target was chosen")
        run.targets = [t for t in run.targets if t not in floors]
    elif floors:
        answer = capture_response(next(iter(gateways.values())), traffic, run.work / "floor-response.bin")
        model_file = repo.version_dir(repository, traffic.model, traffic.version) / repo.MODEL_FILE
        for name in floors:
            floor = start_floor_server(floor_ports[name], answer, run.work,
                                       model_file if name == "grpc-floor-model" else None)
            run.stack.callback(floor.stop)
            gateways[name] = floor
            floor.wait_ready()
            log(f"{name} SERVING on {floor.target} (PID {floor.process.pid}), answering "
                f"{answer.stat().st_size} bytes")


def _embedded_batching(args, repository: Path, traffic: Traffic) -> str:
    """The embedded gateway's micro-batching settings, for the report."""
    from oodguard.serve.settings import Settings
    defaults = Settings(repository=repository)
    wait_ms = defaults.max_wait_ms if args.max_wait_ms is None else args.max_wait_ms
    return f"max_wait_ms={wait_ms:g}, max_batch={defaults.max_batch or traffic.max_batch} (the model's max_batch_size)"


def _run_cells(run: _Run, traffic: Traffic, drivers: Drivers, gateways: dict[str, ServerProcess], triton) -> list[Cell]:
    """Every (round, concurrency, target) cell, the target order reversed every other cell (drift hits both ends)."""
    args, concurrencies, targets = run.args, run.concurrencies, run.targets
    cells: list[Cell] = []
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)  # grpc.aio channels bind to the current loop when they are created
    run.stack.callback(loop.close)
    run.stack.callback(lambda: loop.run_until_complete(drivers.aclose()))
    total = args.rounds * len(concurrencies) * len(targets)
    for rnd in range(args.rounds):
        for c in concurrencies:
            order = targets if (rnd + concurrencies.index(c)) % 2 == 0 else targets[::-1]
            for target in order:
                cell = _measure_cell(args, target, c, rnd, traffic, drivers, gateways, triton, loop)
                cells.append(cell)
                _log_cell(cell, len(cells), total)
    return cells


def _server_pgids(target: str, gateways: dict[str, ServerProcess], triton) -> list[int]:
    """The process groups serving ``target`` (whose CPU time is the server's cost; none for ort-direct)."""
    if target == "ort-direct":
        return []
    if target == "triton-direct":
        return [triton.process.pid]
    pgids = [gateways[target].process.pid]
    return pgids + ([triton.process.pid] if target == "gateway-triton" else [])


def _measure_cell(args, target: str, c: int, rnd: int, traffic: Traffic, drivers: Drivers,
                  gateways: dict[str, ServerProcess], triton, loop) -> Cell:
    """Drive ``target`` at concurrency ``c`` for one warm-up and measured window; its latencies, throughput and CPU."""
    pgids = _server_pgids(target, gateways, triton)
    cpu0 = [group_cpu_seconds(p) for p in pgids]
    client0 = time.process_time()
    flagged = target in FLAGGED_TARGETS
    n_inputs = len(traffic.flagged_inputs if flagged else traffic.inputs)
    if target == "ort-direct":
        w = drive_threads(drivers.ort_call(), c, args.warmup, args.duration, n_inputs)
    else:
        call = drivers.triton_call(triton.url) if target == "triton-direct" else \
            drivers.gateway_call(gateways[target].target, flagged)
        w = loop.run_until_complete(drive_async(call, c, args.warmup, args.duration, n_inputs))
    # CPU over warm-up + measured window, scaled to the measured window's share
    span = args.warmup + args.duration
    scale = args.duration / span
    used = [group_cpu_seconds(p) - a for p, a in zip(pgids, cpu0)]  # per process group
    server_total = sum(used) if pgids else None
    server_cpu = None if server_total is None else server_total * scale
    cell = summarise(target, c, rnd, w, args.duration, server_cpu, (time.process_time() - client0) * scale,
                     server_total)
    if target.startswith("gateway-") and w.answered:  # its first process group is the gateway's
        cell.gateway_cpu_ms_per_request = 1000.0 * used[0] / w.answered
    return cell


def _log_cell(cell: Cell, n: int, total: int) -> None:
    """One progress line per measured cell."""
    log(f"[{n}/{total}] {cell.target:<25} c={cell.concurrency:<3} {cell.throughput_rps:8.0f} req/s  "
        f"p50 {cell.p50_ms:7.2f} ms  p99 {cell.p99_ms:7.2f} ms  errors {cell.errors}"
        + (f" ({cell.first_error})" if cell.errors else "")
        + (f"  server CPU {cell.server_cpu_pct:.0f}% ({cell.cpu_ms_per_request:.3f} ms/req)"
           if cell.server_cpu_pct is not None and cell.cpu_ms_per_request is not None else "")
        + f"  client CPU {cell.client_cpu_pct:.0f}%  load {cell.loadavg:.2f}")


def _write_outputs(run: _Run, repository: Path, build: dict | None, traffic: Traffic, cost: _ModelCost,
                   embedded_batching: str, triton, gateways: dict[str, ServerProcess], cells: list[Cell]) -> str:
    """The report (report.md / report.json, see :func:`write_report`) and the servers' logs in ``--out``; the markdown."""
    args, notes = run.args, run.notes
    for gw in gateways.values():  # a gateway that died during the run is a failed run, not a slow one
        if gw.process.poll() is not None:
            notes.append(f"{gw.name} exited during the run with {gw.process.returncode}")
    agg = aggregate(cells)
    rat = ratios(cells, cost.cpu_ms)
    if any(c.errors for c in cells):
        notes.append("some cells had errors; see report.json (first_error)")
    notes.append(f"{os.cpu_count()} CPU cores shared by the load generator, the gateway and Triton: at concurrency 64 "
                 "the Python load generator itself uses a large share of the CPU (client CPU %), which caps every "
                 "target's throughput; ratios are more meaningful than absolute numbers.")
    meta = {"started": run.started, "machine": f"{platform.node()} ({os.cpu_count()} CPUs, {platform.machine()}, "
            f"Python {platform.python_version()})", "repository": str(repository), "model": traffic.model,
            "version": traffic.version, "backbone": traffic.backbone_name, "backbone_ref": traffic.backbone,
            "request_shape": traffic.request_shape,
            "model_latency_ms": {str(b): v for b, v in cost.latency.items()}, "model_latency_runs": cost.runs,
            "model_latency_loadavg": cost.loadavg, "cpus": os.cpu_count(), "model_cpu_ms": cost.cpu_ms,
            "build": build, "duration_s": args.duration, "warmup_s": args.warmup, "rounds": args.rounds,
            "concurrencies": run.concurrencies, "targets": run.targets, "traffic_inputs": len(traffic.inputs),
            "flagged_share": traffic.flagged_share, "decision_score": traffic.decision_score,
            "embedded_batching": embedded_batching, "notes": notes, "workers": args.workers,
            "baseline_src": None if args.baseline_src is None else str(args.baseline_src),
            "flagged_inputs": 0 if traffic.flagged_inputs is None else len(traffic.flagged_inputs),
            "loadavg_start": run.loadavg_start, "loadavg_end": os.getloadavg(),
            "triton_started_in_s": None if triton is None else triton.started_in_s}
    meta["run_time_s"] = time.monotonic() - run.began
    md = write_report(args.out, meta, cells, agg, rat)
    logs = args.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    for path in run.work.glob("*.log"):
        shutil.copy(path, logs / path.name)
    return md


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; every started process was stopped", file=sys.stderr)
        sys.exit(130)
