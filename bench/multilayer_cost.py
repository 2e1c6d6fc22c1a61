#!/usr/bin/env python
"""What multi-layer SISOM costs: ONNX Runtime CPU latency of fused heads against a logits-only export.

For LeNet-5 (1x28x28) and the CIFAR ResNet-18 (3x32x32), four ONNX graphs of the same random classifier:

- ``logits``: backbone and head alone;
- ``penultimate``: the fused head with ``sisom`` + ``sisome`` (forward pass only);
- ``multi-layer``: the fused head with ``sisom_ml`` + ``sisome_ml`` (forward pass plus the hand-written
  backward pass through the backbone's tail, from the earliest named layer to the features);
- ``registry``: every score of the registry (what ``oodguard export`` ships, less the fused p-value score).

Runs are interleaved (one of each model per round, until the time budget per batch size is spent) and the
median latency of each is divided by the logits-only median of the same rounds, so machine noise hits all
alike. Banks of ``--bank-size`` samples are random arrays of the right shapes (cost depends on shapes, not on
what was learned); steepness is fixed (no search). Also prints each graph's export time and file size.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cost import export_logits_only, run_ms  # noqa: E402
from oodguard.export import layers  # noqa: E402
from oodguard.export.backbones import Classifier, lenet5, resnet18_cifar  # noqa: E402
from oodguard.export.fused import FusedModel, export_onnx  # noqa: E402
from oodguard.export.pipeline import fit_scores  # noqa: E402
from oodguard.export.scores import FitData  # noqa: E402
from oodguard.onnx_runner import OnnxModel  # noqa: E402

BACKBONES = {"LeNet-5": (lenet5, (1, 28, 28)), "ResNet-18 32x32": (resnet18_cifar, (3, 32, 32))}
HEADS = {"penultimate": ("sisom", "sisome"), "multi-layer": ("sisom_ml", "sisome_ml"), "registry": None}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bank-size", type=int, default=5000, help="bank samples of every bank-based score (default 5000)")
    parser.add_argument("--classes", type=int, default=10, help="number of classes (default 10)")
    parser.add_argument("--batches", default="1,64", help="batch sizes, comma-separated (default 1,64)")
    parser.add_argument("--seconds", type=float, default=10.0, help="timing budget per backbone and batch size (default 10)")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (default 1)")
    parser.add_argument("--backbones", default=",".join(BACKBONES), help=f"which backbones (default: {','.join(BACKBONES)})")
    parser.add_argument("--out", type=Path, default=None, help="folder for the ONNX files (default: a temporary one)")
    return parser.parse_args(argv)


def random_fit_data(classifier: Classifier, input_shape, bank_size: int, num_classes: int, seed: int) -> FitData:
    """A bank of random non-negative activations and signed gradients with each layer's width."""
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        _, _, pooled = layers.pooled(classifier, torch.zeros(1, *input_shape), layers.names(classifier.backbone))
    layer_data = {name: (np.abs(rng.normal(size=(bank_size, a.shape[1]))).astype(np.float32),
                         rng.normal(scale=1e-3, size=(bank_size, a.shape[1])).astype(np.float32))
                  for name, (a, _) in pooled.items()}
    features = layer_data[layers.PENULTIMATE][0]
    weight, bias = classifier.head.weight.detach().numpy(), classifier.head.bias.detach().numpy()
    labels = np.arange(bank_size) % num_classes
    return FitData(features, features @ weight.T + bias, labels, np.arange(bank_size), weight, bias, seed=seed,
                   layers=layer_data)


def build(name: str, out: Path, bank_size: int, num_classes: int, seed: int = 0) -> dict[str, dict]:
    """Each model's ONNX path, export seconds and size in MB."""
    factory, shape = BACKBONES[name]
    torch.manual_seed(seed)
    classifier = Classifier(factory(), num_classes).eval()
    scores = fit_scores(random_fit_data(classifier, shape, bank_size, num_classes, seed),
                        {"sisom": {"alpha": 1.0}, "sisom_ml": {"relative_alpha": 1.0}, "knn": {"k": 10}})
    stem = name.split()[0].lower()
    models = {}
    start = time.perf_counter()
    path = export_logits_only(classifier, shape, out / f"{stem}-logits.onnx")
    models["logits"] = {"path": path, "export_s": time.perf_counter() - start}
    for head, names in HEADS.items():
        chosen = scores if names is None else {n: scores[n] for n in names}
        start = time.perf_counter()
        path = export_onnx(FusedModel(classifier, chosen).eval(), shape, out / f"{stem}-{head}.onnx")
        models[head] = {"path": path, "export_s": time.perf_counter() - start}
    for model in models.values():
        model["size_mb"] = model["path"].stat().st_size / 1e6
    return models


def interleaved(models: dict[str, dict], shape, batch: int, budget_s: float, threads: int, seed: int = 0) -> dict[str, float]:
    """Median milliseconds per model, timed round-robin."""
    sessions = {name: OnnxModel(m["path"], intra_op_threads=threads).session for name, m in models.items()}
    x = np.random.default_rng(seed).normal(size=(batch, *shape)).astype(np.float32)
    samples = {name: [] for name in sessions}
    for _ in range(3):  # warm-up
        for session in sessions.values():
            run_ms(session, x)
    deadline = time.perf_counter() + budget_s
    while time.perf_counter() < deadline or len(samples["logits"]) < 5:
        for name, session in sessions.items():
            samples[name].append(run_ms(session, x))
    return {name: float(np.median(values)) for name, values in samples.items()}


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    out = args.out or Path(tempfile.mkdtemp(prefix="multilayer-cost-"))
    out.mkdir(parents=True, exist_ok=True)
    batches = [int(b) for b in args.batches.split(",")]
    print(f"bank {args.bank_size}, {args.classes} classes, ONNX Runtime CPU, {args.threads} thread(s), "
          f"{args.seconds:.0f} s interleaved per batch size")
    print("| backbone | batch | logits ms | penultimate | multi-layer | registry | multi-layer ms |")
    print("|---|---|---|---|---|---|---|")
    builds = {}
    for name in args.backbones.split(","):
        models = builds[name] = build(name, out, args.bank_size, args.classes)
        shape = BACKBONES[name][1]
        for batch in batches:
            ms = interleaved(models, shape, batch, args.seconds, args.threads)
            ratios = {head: ms[head] / ms["logits"] for head in HEADS}
            print(f"| {name} | {batch} | {ms['logits']:.3f} | {ratios['penultimate']:.2f}x | "
                  f"{ratios['multi-layer']:.2f}x | {ratios['registry']:.2f}x | {ms['multi-layer']:.3f} |", flush=True)
    print("\n| backbone | model | export s | size MB |\n|---|---|---|---|")
    for name, models in builds.items():
        for head, model in models.items():
            print(f"| {name} | {head} | {model['export_s']:.1f} | {model['size_mb']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
