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
from oodguard.export.pipeline import fit_scores
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


def resnet18_models(out_dir: Path, bank_size: int = 5000, num_classes: int = 10, seed: int = 0) -> tuple[Path, Path]:
    """Fused and logits-only ONNX of a CIFAR ResNet-18 with a ``bank_size`` bank. Weights and bank are
    random (non-negative features, like a ReLU output): cost depends on shapes (bank size, feature
    dimension, classes), not on what was learned, and this avoids 5,000 ResNet forward passes."""
    torch.manual_seed(seed)
    classifier = Classifier(resnet18_cifar(), num_classes).eval()
    rng = np.random.default_rng(seed)
    features = np.abs(rng.normal(size=(bank_size, classifier.feature_dim))).astype(np.float32)
    weight = classifier.head.weight.detach().numpy()
    bias = classifier.head.bias.detach().numpy()
    logits = features @ weight.T + bias
    labels = np.arange(bank_size) % num_classes
    data = FitData(features, logits, labels, np.arange(bank_size), weight, bias, seed=seed)
    model = FusedModel(classifier, fit_scores(data, {"sisom": {"alpha": 1.0}})).eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    return (export_onnx(model, (3, 32, 32), out_dir / "resnet18_fused.onnx"),
            export_logits_only(classifier, (3, 32, 32), out_dir / "resnet18_logits.onnx"))
