"""Reduced feature bank (RS): a representative subset per class, chosen by class-wise ProbCover.

ProbCover (Yehuda et al. 2022) greedily picks the point whose delta-ball covers the most points not
yet covered. Choices (the SISOM paper gives no delta): it runs on L2-normalised penultimate features
(independent of the sigmoid steepness, so the alpha search can run on the reduced bank); each class
keeps a share of ``size`` proportional to its frequency (at least 2, which SISOM's leave-one-out
needs); delta is the median distance from a class's points to their ``ceil(n_c / m_c)``-th nearest
same-class neighbour, so that one ball covers about ``n_c / m_c`` points; if every point is covered
before ``m_c`` picks, the rest are drawn at random (seeded) from the unpicked points. Classes with more
than ``max_class_points`` points are subsampled (seeded) before the greedy search to bound memory.
"""

from __future__ import annotations

import math

import numpy as np

from .scores.base import numpy_squared_distances
from .scores.knn import normalise


def class_quota(labels: np.ndarray, size: int) -> dict[int, int]:
    classes, counts = np.unique(labels, return_counts=True)
    if size < 2 * len(classes):
        raise ValueError(f"bank size {size} is too small: at least 2 per class ({2 * len(classes)}) are needed")
    quota = np.maximum(np.floor(counts * size / counts.sum()).astype(int), 2)
    quota = np.minimum(quota, counts)
    return {int(c): int(q) for c, q in zip(classes, quota)}


def probcover(points: np.ndarray, picks: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``picks`` points chosen greedily by delta-ball coverage (see module docstring)."""
    n = len(points)
    if picks >= n:
        return np.arange(n)
    d2 = numpy_squared_distances(points, points)
    neighbour_rank = min(math.ceil(n / picks), n - 1)
    delta2 = float(np.median(np.partition(d2, neighbour_rank, axis=1)[:, neighbour_rank]))
    balls = d2 <= delta2
    gain = balls.sum(axis=1).astype(np.int64)
    covered = np.zeros(n, bool)
    chosen: list[int] = []
    while len(chosen) < picks and gain.max() > 0:
        best = int(np.argmax(gain))
        newly = balls[best] & ~covered
        covered |= newly
        gain -= balls[:, newly].sum(axis=1)
        gain[best] = -1
        chosen.append(best)
    if len(chosen) < picks:
        rest = np.setdiff1d(np.arange(n), chosen)
        chosen.extend(rng.choice(rest, size=picks - len(chosen), replace=False).tolist())
    return np.sort(np.asarray(chosen, dtype=np.int64))


def reduce_bank(features: np.ndarray, labels: np.ndarray, size: int, seed: int = 0,
                max_class_points: int = 8000) -> np.ndarray:
    """Indices (into ``features``) of a bank of about ``size`` samples, class-wise ProbCover."""
    if size >= len(features):
        return np.arange(len(features))
    rng = np.random.default_rng(seed)
    unit = normalise(np.asarray(features, np.float64))
    chosen = []
    for cls, picks in class_quota(labels, size).items():
        members = np.flatnonzero(labels == cls)
        if len(members) > max_class_points:
            members = np.sort(rng.choice(members, size=max_class_points, replace=False))
        chosen.append(members[probcover(unit[members], picks, rng)])
    return np.sort(np.concatenate(chosen))
