"""Validation OOD and the objective every export-time choice maximises.

Every choice the export makes from data (SISOM's steepness, kNN's k, the reduced bank's method, which
scores the fused decision combines) is judged the same way, on data the model never trained on and that is
not a test set: in-distribution scores (held-out calibration images, or leave-one-out bank samples) against
the scores of *validation OOD*, in groups:

- ``near``: class blends and 4x4 jigsaws of training images (plausible strokes, wrong whole);
- ``far``: pixel permutations of training images (the intensity histogram of a digit, no structure);
- ``user:<spec>``: each ``oodguard export --validation-ood SPEC`` set, a group of its own.

The objective is the **worst group's AUROC** (ties broken by the mean over groups): a score that wins far
OOD but loses near OOD (or the reverse) does not win, as it can with one objective over all validation images
(the logit scores win far, the feature distances near).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.metrics import roc_auc_score

NEAR, FAR = "near", "far"


@dataclass(frozen=True)
class ValidationOOD:
    """Validation OOD model inputs ``[N, C, H, W]`` (float32) and the group of each (``[N]`` str)."""

    images: np.ndarray
    groups: np.ndarray

    def __post_init__(self) -> None:
        if len(self.images) != len(self.groups):
            raise ValueError(f"{len(self.images)} validation images but {len(self.groups)} group labels")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def group_sizes(self) -> dict[str, int]:
        names, counts = np.unique(self.groups, return_counts=True)
        return {str(n): int(c) for n, c in zip(names, counts)}

    @classmethod
    def concatenate(cls, parts: list["ValidationOOD"]) -> "ValidationOOD":
        parts = [p for p in parts if len(p)]
        if not parts:
            return cls(np.zeros((0, 0, 0, 0), np.float32), np.zeros(0, dtype=object))
        return cls(np.concatenate([p.images for p in parts]).astype(np.float32),
                   np.concatenate([np.asarray(p.groups, dtype=object) for p in parts]))


def objective(id_scores: np.ndarray, ood_scores: np.ndarray, groups: np.ndarray) -> dict:
    """AUROC (higher score = more OOD) of ID against each group, the worst of them and their mean."""
    id_scores, ood_scores = _finite(np.asarray(id_scores, np.float64), np.asarray(ood_scores, np.float64))
    per_group = {}
    for group in sorted(set(np.asarray(groups).tolist())):
        ood = ood_scores[np.asarray(groups) == group]
        truth = np.r_[np.zeros(len(id_scores)), np.ones(len(ood))]
        per_group[group] = float(roc_auc_score(truth, np.r_[id_scores, ood]))
    values = list(per_group.values())
    return {"auroc": per_group, "worst": min(values), "mean": float(np.mean(values))}


def _finite(*arrays: np.ndarray) -> list[np.ndarray]:
    """NaN and +inf become the most OOD value (the guard fails closed), -inf the least; others unchanged."""
    finite = np.concatenate([a[np.isfinite(a)] for a in arrays] or [np.zeros(0)])
    top, bottom = (finite.max() + 1.0, finite.min() - 1.0) if len(finite) else (1.0, -1.0)
    return [np.where(np.isnan(a) | (a == np.inf), top, np.where(a == -np.inf, bottom, a)) for a in arrays]


def key(result: dict) -> tuple[float, float]:
    """Sort key of an :func:`objective` result: the worst group first, then the mean."""
    return (round(result["worst"], 12), round(result["mean"], 12))
