"""Reduced feature bank (RS): a subset of about ``size`` training samples, chosen per class.

Class quotas (:func:`class_quota`) are *water-filled*: every class keeps ``min(n_c, share)`` samples, with
``share`` the largest value whose total fits ``size``. A small class is kept whole and the large ones
share the rest equally. (Proportional quotas cut a class of 80 images next to 6,000-image classes to 8
bank samples: its images then lie far from their nearest bank neighbours, and SISOM / kNN flag the class
wholesale; that is how a class added by a retrain looks.) Every class keeps at least 2 samples, which
SISOM's leave-one-out needs.

Two ways to pick a class's quota (``method``):

- ``"probcover"``: ProbCover (Yehuda et al. 2022) greedily picks the point whose delta-ball covers the
  most points not yet covered. Choices (the SISOM paper gives no delta): it runs on L2-normalised
  penultimate features (independent of the sigmoid steepness, so the alpha search can run on the reduced
  bank); delta is the median distance from a class's points to their ``ceil(n_c / m_c)``-th nearest
  same-class neighbour, so that one ball covers about ``n_c / m_c`` points; if every point is covered
  before ``m_c`` picks, the rest are drawn at random (seeded). Classes with more than
  ``max_class_points`` points are subsampled (seeded) before the greedy search to bound memory.
- ``"random"``: a seeded uniform draw per class (a class-stratified random bank). Coverage picks
  over-represent a class's sparse outskirts, which moves density-based scores; the export compares both
  on validation data and keeps ProbCover only where it is not worse (:mod:`oodguard.export.fitting`).
"""

from __future__ import annotations

import math

import numpy as np

from oodguard import progress

from .scores.base import numpy_squared_distances
from .scores.knn import normalise


METHODS = ("probcover", "random")


def class_quota(labels: np.ndarray, size: int) -> dict[int, int]:
    """Water-filled quotas: ``min(n_c, share)`` per class, ``share`` as large as ``size`` allows (the
    remainder of an uneven split goes to the largest classes, one each)."""
    classes, counts = np.unique(labels, return_counts=True)
    if size < 2 * len(classes):
        raise ValueError(f"bank size {size} is too small: at least 2 per class ({2 * len(classes)}) are needed")
    if size >= counts.sum():
        return {int(c): int(n) for c, n in zip(classes, counts)}
    quota = np.zeros(len(counts), dtype=np.int64)
    left, open_ = size, np.ones(len(counts), bool)
    while open_.any():
        share = left // int(open_.sum())
        full = open_ & (counts <= share)
        if not full.any():  # every open class is larger than the share: split what is left
            quota[open_] = share
            extra = left - share * int(open_.sum())
            largest = np.flatnonzero(open_)[np.argsort(-counts[open_], kind="stable")[:extra]]
            quota[largest] += 1
            break
        quota[full] = counts[full]
        left -= int(counts[full].sum())
        open_ &= ~full
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
                max_class_points: int = 8000, method: str = "probcover") -> np.ndarray:
    """Indices (into ``features``) of a bank of ``size`` samples (at most), chosen per class by ``method``."""
    if method not in METHODS:
        raise ValueError(f"bank method must be one of {METHODS}, got {method!r}")
    if size >= len(features):
        return np.arange(len(features))
    rng = np.random.default_rng(seed)
    unit = normalise(np.asarray(features, np.float64)) if method == "probcover" else None
    chosen = []
    quotas = class_quota(labels, size).items()
    if method == "probcover":  # the greedy search is the slow part: one step per class (a random draw is instant)
        quotas = progress.track(quotas, desc=f"ProbCover bank of {size}", unit="class")
    for cls, picks in quotas:
        members = np.flatnonzero(labels == cls)
        if method == "random":
            chosen.append(np.sort(rng.choice(members, size=picks, replace=False)))
            continue
        if len(members) > max_class_points:
            members = np.sort(rng.choice(members, size=max_class_points, replace=False))
        chosen.append(members[probcover(unit[members], picks, rng)])
    return np.sort(np.concatenate(chosen))
