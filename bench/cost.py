"""What the fused head costs: ONNX Runtime latency of the fused model vs a logits-only export of the
same backbone, measured interleaved in one run so that machine noise hits both alike."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from oodguard.export.backbones import Classifier, resnet18_cifar
from oodguard.export.fused import FusedModel, export_module, export_onnx
from oodguard.export.fitting import fit_scores
from oodguard.export.scores import FitData
from oodguard.onnx_runner import OnnxModel


class LogitsOnly(torch.nn.Module):
    """The backbone and head alone, exported with the same exporter for the comparison."""

    def __init__(self, classifier: Classifier):
        super().__init__()
        self.classifier = classifier

    def forward(self, input):
        return self.classifier(input)


def export_logits_only(classifier: Classifier, input_shape, path: Path) -> Path:
    return export_module(LogitsOnly(classifier), input_shape, path, ["logits"])


@dataclass
class Timing:
    batch: int
    fused_ms: float
    logits_ms: float

    @property
    def ratio(self) -> float:
        return self.fused_ms / self.logits_ms

    def row(self, name: str) -> dict:
        return {"model": name, "batch": self.batch, "fused_ms": self.fused_ms, "logits_ms": self.logits_ms,
                "fused_per_s": 1000 * self.batch / self.fused_ms, "logits_per_s": 1000 * self.batch / self.logits_ms,
                "overhead_pct": 100 * (self.ratio - 1)}


def run_ms(session, x: np.ndarray) -> float:
    start = time.perf_counter()
    session.run(None, {"input": x})
    return 1000 * (time.perf_counter() - start)


def compare_latency(fused_path: Path, logits_path: Path, input_shape, batches=(1, 64), budget_s: float = 20.0,
                    seed: int = 0) -> list[Timing]:
    """Median latency of both models per batch size; runs alternate fused/logits until ``budget_s`` per batch."""
    fused = OnnxModel(fused_path).session
    logits = OnnxModel(logits_path).session
    rng = np.random.default_rng(seed)
    timings = []
    for batch in batches:
        x = rng.normal(size=(batch, *input_shape)).astype(np.float32)
        for _ in range(3):  # warm-up
            run_ms(fused, x), run_ms(logits, x)
        samples_f, samples_l = [], []
        deadline = time.perf_counter() + budget_s
        while time.perf_counter() < deadline or len(samples_f) < 5:
            samples_f.append(run_ms(fused, x))
            samples_l.append(run_ms(logits, x))
        timings.append(Timing(batch, float(np.median(samples_f)), float(np.median(samples_l))))
    return timings


def random_fit_data(classifier: Classifier, input_shape, bank_size: int, num_classes: int, seed: int = 0,
                    multi_layer: bool = True) -> FitData:
    """A bank of ``bank_size`` random samples with the classifier's shapes: non-negative activations (like a
    ReLU output) and signed small gradients for every SISOM layer of the backbone (``multi_layer``; else the
    penultimate features alone, as a default export extracts them). Cost depends on shapes (bank size, widths,
    classes), not on what was learned, and this avoids thousands of forward and backward passes."""
    from oodguard.export import layers

    rng = np.random.default_rng(seed)
    names = layers.names(classifier.backbone) if multi_layer else (layers.PENULTIMATE,)
    with torch.no_grad():
        _, _, pooled = layers.pooled(classifier, torch.zeros(1, *input_shape), names)
    layer_data = {name: (np.abs(rng.normal(size=(bank_size, a.shape[1]))).astype(np.float32),
                         rng.normal(scale=1e-3, size=(bank_size, a.shape[1])).astype(np.float32))
                  for name, (a, _) in pooled.items()}
    features = layer_data[layers.PENULTIMATE][0]
    weight, bias = classifier.head.weight.detach().numpy(), classifier.head.bias.detach().numpy()
    labels = np.arange(bank_size) % num_classes
    return FitData(features, features @ weight.T + bias, labels, np.arange(bank_size), weight, bias, seed=seed,
                   layers=layer_data if multi_layer and names != (layers.PENULTIMATE,) else None)


#: fixed hyper-parameters of the cost models (no search: cost does not depend on them)
FIXED_PARAMS = {"sisom": {"alpha": 1.0}, "knn": {"k": 10}}
FIXED_MULTI_LAYER_PARAMS = {**FIXED_PARAMS, "sisom_ml": {"relative_alpha": 1.0}}


def resnet18_models(out_dir: Path, bank_size: int = 5000, num_classes: int = 10, seed: int = 0,
                    multi_layer: bool = False) -> tuple[Path, Path]:
    """Fused and logits-only ONNX of a CIFAR ResNet-18 with a ``bank_size`` bank (random weights and bank:
    :func:`random_fit_data`), every score a default export fits, or with ``multi_layer`` every score an
    ``oodguard export --multi-layer`` fits (the multi-layer scores on their own bank of at most
    ``MULTI_LAYER_BANK_SIZE``, as the export draws it, and the backward pass through layer1-layer4)."""
    from oodguard.export.spec import MULTI_LAYER_BANK_SIZE

    torch.manual_seed(seed)
    classifier = Classifier(resnet18_cifar(), num_classes).eval()
    data = random_fit_data(classifier, (3, 32, 32), bank_size, num_classes, seed, multi_layer)
    scores = (fit_scores(data, FIXED_MULTI_LAYER_PARAMS, True, MULTI_LAYER_BANK_SIZE) if multi_layer
              else fit_scores(data, FIXED_PARAMS))
    model = FusedModel(classifier, scores).eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    name = "resnet18_fused_multilayer.onnx" if multi_layer else "resnet18_fused.onnx"
    return (export_onnx(model, (3, 32, 32), out_dir / name),
            export_logits_only(classifier, (3, 32, 32), out_dir / "resnet18_logits.onnx"))
