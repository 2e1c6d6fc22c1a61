"""Score datasets with an exported model version and compare ID against OOD sets, per score.

Scores come from the exported ONNX model (what is served), never from a separate code path. Images
of another shape are converted with the version's recorded preprocessing, and the conversion is
reported.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .calibration import Calibration
from .datasets import Dataset
from .metrics import auroc, fpr_at_tpr
from .onnx_runner import OnnxModel
from .preprocess import Preprocessing
from .repository import CALIBRATION_FILE, MODEL_FILE


@dataclass
class ScoredSet:
    name: str
    scores: dict[str, np.ndarray]
    conversion: list[str]


class VersionScorer:
    """One model version folder: its ONNX session, calibration and preprocessing."""

    def __init__(self, version_dir: str | Path):
        version_dir = Path(version_dir)
        self.calibration = Calibration.load(version_dir / CALIBRATION_FILE)
        self.model = OnnxModel(version_dir / MODEL_FILE)
        self.preprocessing = Preprocessing.from_dict(self.calibration.model["preprocessing"])

    @property
    def score_names(self) -> list[str]:
        return list(self.calibration.model["scores"])

    def score(self, name: str, dataset: Dataset) -> ScoredSet:
        outputs = self.model.run(self.preprocessing.apply(dataset.images))
        conversion = self.preprocessing.conversion_steps(dataset.images.shape[1:])
        return ScoredSet(name, {s: outputs[s] for s in self.score_names}, conversion)


def compare(scorer: VersionScorer, in_dist: ScoredSet, ood: ScoredSet) -> dict[str, dict[str, float]]:
    """Per score: AUROC, FPR@95TPR, and the realised TPR / FPR at the calibrated threshold."""
    rows = {}
    for name in scorer.score_names:
        threshold = scorer.calibration.thresholds[name]
        id_scores, ood_scores = in_dist.scores[name], ood.scores[name]
        rows[name] = {
            "auroc": auroc(id_scores, ood_scores),
            "fpr_at_95tpr": fpr_at_tpr(id_scores, ood_scores, 0.95),
            "calibrated_tpr": float(np.mean(~threshold.is_ood(id_scores))),
            "calibrated_fpr": float(np.mean(~threshold.is_ood(ood_scores))),
        }
    return rows


def uniform_noise(count: int, shape: tuple[int, ...], seed: int = 0) -> Dataset:
    """Far-OOD: uint8 images of independent uniform pixels."""
    images = np.random.default_rng(seed).integers(0, 256, size=(count, *shape), dtype=np.uint8)
    return Dataset(images, None, None, f"uniform-noise(seed={seed})")
