#!/usr/bin/env python
"""What multi-layer SISOM costs: ONNX Runtime CPU latency of fused heads against a logits-only export.

For LeNet-5 (1x28x28) and the CIFAR ResNet-18 (3x32x32), five ONNX graphs of the same random classifier:

- ``logits``: backbone and head alone;
- ``penultimate``: the fused head with ``sisom`` + ``sisome`` (forward pass only);
- ``multi-layer``: the fused head with ``sisom_ml`` + ``sisome_ml`` (forward pass plus the hand-written
  backward pass through the backbone's tail, from the earliest named layer to the features; their own bank
  of at most ``--multi-layer-bank-size`` samples, as ``oodguard export --multi-layer`` draws it);
- ``default``: every score a default ``oodguard export`` fits (no multi-layer scores);
- ``--multi-layer``: every score ``oodguard export --multi-layer`` fits.

(Neither ships the fused p-value score here: it adds ~1 µs per item, measured by bench/mnist_benchmark.py.)

One interleaved run: per batch size, every graph of both backbones is timed round-robin (one call of each per
round, or several of each for the faster backbone, each timed) until the time budget is spent and at least
``--min-rounds`` rounds ran; each median is divided by the logits-only median of the same backbone from the
same rounds, so machine noise hits all alike. Each call is timed twice: the calling thread's CPU time (with
one intra-op thread ONNX Runtime runs the graph in the calling thread, so this leaves out the time the
process waits for a core, which on a busy machine grows with a call's length and inflates the ratios of the
heavier graphs) and wall time; both tables are printed, CPU time first. The load average is printed before
and after. Banks of ``--bank-size`` samples are random arrays of the right shapes
(cost depends on shapes, not on what was learned); steepness and k are fixed (no search). Also prints each
graph's export time and file size.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cost import FIXED_MULTI_LAYER_PARAMS, export_logits_only, random_fit_data  # noqa: E402
from oodguard.export.backbones import Classifier, lenet5, resnet18_cifar  # noqa: E402
from oodguard.export.fused import FusedModel, export_onnx  # noqa: E402
from oodguard.export.fitting import fit_scores  # noqa: E402
from oodguard.export.spec import MULTI_LAYER_BANK_SIZE  # noqa: E402
from oodguard.export.scores import MULTI_LAYER  # noqa: E402
from oodguard.onnx_runner import OnnxModel  # noqa: E402

BACKBONES = {"LeNet-5": (lenet5, (1, 28, 28)), "ResNet-18 32x32": (resnet18_cifar, (3, 32, 32))}
HEADS = {"penultimate": ("sisom", "sisome"), "multi-layer": MULTI_LAYER, "default": "default",
         "--multi-layer": None}
FILES = {"penultimate": "penultimate", "multi-layer": "multilayer-head", "default": "default",
         "--multi-layer": "default-multilayer"}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bank-size", type=int, default=5000, help="bank samples of every bank-based score (default 5000)")
    parser.add_argument("--multi-layer-bank-size", type=int, default=MULTI_LAYER_BANK_SIZE,
                        help=f"limit of the multi-layer scores' own bank, as export's (default {MULTI_LAYER_BANK_SIZE})")
    parser.add_argument("--classes", type=int, default=10, help="number of classes (default 10)")
    parser.add_argument("--batches", default="1,64", help="batch sizes, comma-separated (default 1,64)")
    parser.add_argument("--seconds", type=float, default=20.0, help="timing budget per batch size, all graphs together (default 20)")
    parser.add_argument("--min-rounds", type=int, default=7, help="at least this many rounds per batch size (default 7)")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (default 1)")
    parser.add_argument("--backbones", default=",".join(BACKBONES), help=f"which backbones (default: {','.join(BACKBONES)})")
    parser.add_argument("--out", type=Path, default=None, help="folder for the ONNX files (default: a temporary one)")
    return parser.parse_args(argv)


def build(name: str, out: Path, bank_size: int, ml_bank_size: int | None, num_classes: int, seed: int = 0) -> dict[str, dict]:
    """Each model's ONNX path, export seconds and size in MB."""
    factory, shape = BACKBONES[name]
    torch.manual_seed(seed)
    classifier = Classifier(factory(), num_classes).eval()
    data = random_fit_data(classifier, shape, bank_size, num_classes, seed)
    scores = fit_scores(data, FIXED_MULTI_LAYER_PARAMS, True, ml_bank_size)
    stem = name.split()[0].lower()
    models = {}
    start = time.perf_counter()
    path = export_logits_only(classifier, shape, out / f"{stem}-logits.onnx")
    models["logits"] = {"path": path, "export_s": time.perf_counter() - start}
    for head, names in HEADS.items():
        if names is None:
            chosen = scores
        elif names == "default":
            chosen = {n: s for n, s in scores.items() if n not in MULTI_LAYER}
        else:
            chosen = {n: scores[n] for n in names}
        start = time.perf_counter()
        path = export_onnx(FusedModel(classifier, chosen).eval(), shape, out / f"{stem}-{FILES[head]}.onnx")
        models[head] = {"path": path, "export_s": time.perf_counter() - start}
    for model in models.values():
        model["size_mb"] = model["path"].stat().st_size / 1e6
    return models


def timed(session, x: np.ndarray) -> tuple[float, float]:
    """(thread CPU ms, wall ms) of one call."""
    wall, cpu = time.perf_counter(), time.thread_time()
    session.run(None, {"input": x})
    return 1000 * (time.thread_time() - cpu), 1000 * (time.perf_counter() - wall)


def interleaved(builds: dict[str, dict[str, dict]], batch: int, budget_s: float, min_rounds: int, threads: int,
                seed: int = 0) -> tuple[dict[str, dict[str, dict[str, float]]], int]:
    """Median milliseconds per clock (``cpu``, ``wall``), backbone and model, every model of every backbone
    timed round-robin; and the number of rounds."""
    rng = np.random.default_rng(seed)
    runs = []
    for backbone, models in builds.items():
        x = rng.normal(size=(batch, *BACKBONES[backbone][1])).astype(np.float32)
        for head, model in models.items():
            runs.append((backbone, head, OnnxModel(model["path"], intra_op_threads=threads).session, x))
    samples = {(backbone, head): [] for backbone, head, _, _ in runs}
    warm = {key: [] for key in samples}
    for _ in range(3):  # warm-up
        for backbone, head, session, x in runs:
            warm[backbone, head].append(timed(session, x)[0])
    # a faster backbone's graphs are called several times per round (each call timed), so that both backbones
    # get enough samples from the same rounds: about 1/8 of the slowest backbone's logits time, at most 50
    logits = {backbone: float(np.median(warm[backbone, "logits"])) for backbone in builds}
    reps = {backbone: int(np.clip(round(max(logits.values()) / ms / 8), 1, 50)) for backbone, ms in logits.items()}
    deadline, rounds = time.perf_counter() + budget_s, 0
    while time.perf_counter() < deadline or rounds < min_rounds:
        for backbone in builds:
            for _ in range(reps[backbone]):
                for name, head, session, x in runs:
                    if name == backbone:
                        samples[backbone, head].append(timed(session, x))
        rounds += 1
    ms = {clock: {backbone: {} for backbone in builds} for clock in ("cpu", "wall")}
    for (backbone, head), values in samples.items():
        for i, clock in enumerate(("cpu", "wall")):
            ms[clock][backbone][head] = float(np.median([v[i] for v in values]))
    return ms, rounds


def load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    out = args.out or Path(tempfile.mkdtemp(prefix="multilayer-cost-"))
    out.mkdir(parents=True, exist_ok=True)
    batches = [int(b) for b in args.batches.split(",")]
    builds = {name: build(name, out, args.bank_size, args.multi_layer_bank_size, args.classes)
              for name in args.backbones.split(",")}
    ml_bank = min(args.bank_size, args.multi_layer_bank_size or args.bank_size)
    print(f"bank {args.bank_size} (multi-layer scores: {ml_bank}), {args.classes} classes, ONNX Runtime CPU, "
          f"{args.threads} thread(s), one interleaved run per batch size ({args.seconds:.0f} s, at least "
          f"{args.min_rounds} rounds); {os.cpu_count()} CPUs, load average before {load()}")
    results = [(batch, *interleaved(builds, batch, args.seconds, args.min_rounds, args.threads)) for batch in batches]
    for clock, title in (("cpu", "thread CPU time"), ("wall", "wall time")):
        print(f"\nLatency × logits-only, {title} (median of the same rounds):\n")
        print("| backbone | batch | logits ms | penultimate head | multi-layer head | all scores (default) "
              "| all scores (--multi-layer) | --multi-layer ms | rounds |")
        print("|---|---|---|---|---|---|---|---|---|")
        for batch, ms, rounds in results:
            for name, row in ms[clock].items():
                ratios = {head: row[head] / row["logits"] for head in HEADS}
                print(f"| {name} | {batch} | {row['logits']:.3f} | {ratios['penultimate']:.2f}x | "
                      f"{ratios['multi-layer']:.2f}x | {ratios['default']:.2f}x | {ratios['--multi-layer']:.2f}x | "
                      f"{row['--multi-layer']:.3f} | {rounds} |", flush=True)
    print(f"\nload average after: {load()}")
    print("\n| backbone | model | export s | size MB |\n|---|---|---|---|")
    for name, models in builds.items():
        for head, model in models.items():
            print(f"| {name} | {head} | {model['export_s']:.1f} | {model['size_mb']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
