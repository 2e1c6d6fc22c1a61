"""The greedy diversity rule shared by sisom-diverse and open-quota.

Each pick joins the bank, so items close to it are no longer surprising (SISOM's ratio ``d_in / d_out`` drops
for such an item to about (distance to the pick) / (distance between classes)). Scale-free version, greedy:
next pick = argmax of ``value(x) · min(1, d(x) / ρ)``, ``d(x)`` = Euclidean distance from x to its nearest
pick on L2-normalised features (∞ before the first pick), ties by lowest index. ρ = 0 disables the discount.
With ``groups`` and ``quotas`` a pick is only taken from a group with quota left (group −1: never). Cost
O(B·N·D).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def pool_spread(x: np.ndarray, rng: np.random.Generator, limit: int = 2000) -> float:
    """Median pairwise Euclidean distance of (a seeded sample of at most ``limit``) unit rows."""
    sample = x if len(x) <= limit else x[rng.choice(len(x), size=limit, replace=False)]
    d2 = np.maximum(2.0 - 2.0 * (sample @ sample.T).astype(np.float64), 0.0)
    upper = d2[np.triu_indices(len(sample), k=1)]
    return float(np.sqrt(np.median(upper))) if len(upper) else 0.0


@dataclass
class Picks:
    indices: np.ndarray  # [B] in pick order
    distance: np.ndarray  # [B] distance to the nearest earlier pick at pick time (inf for the first)
    factor: np.ndarray  # [B] the diversity factor at pick time


def greedy_diverse(x: np.ndarray, value: np.ndarray, radius: float, budget: int, groups: np.ndarray | None = None,
                   quotas: np.ndarray | None = None) -> Picks:
    """``budget`` picks by the rule of the module docstring; ``x`` unit rows, ``value`` ≥ 0 per row. With
    quotas, ``sum(quotas)`` must not exceed the eligible rows of the groups (each quota ≤ its group's size)."""
    n = len(x)
    allowed = np.ones(n, dtype=bool)
    left = None
    if quotas is not None:
        left = np.asarray(quotas, dtype=np.int64).copy()
        groups = np.asarray(groups, dtype=np.int64)
        allowed = (groups >= 0) & (left[np.maximum(groups, 0)] > 0)
    factor = np.ones(n)
    d2 = np.full(n, np.inf)
    taken = np.zeros(n, dtype=bool)
    indices, distance, factors = [], [], []
    for _ in range(budget):
        candidate = np.where(allowed & ~taken, value * factor, -np.inf)
        pick = int(np.argmax(candidate))
        indices.append(pick)
        distance.append(float(np.sqrt(d2[pick])))
        factors.append(float(factor[pick]))
        taken[pick] = True
        if left is not None:
            left[groups[pick]] -= 1
            if left[groups[pick]] == 0:
                allowed &= groups != groups[pick]
        np.minimum(d2, np.maximum(2.0 - 2.0 * (x @ x[pick]).astype(np.float64), 0.0), out=d2)
        if radius > 0:
            factor = np.minimum(1.0, np.sqrt(d2) / radius)
    return Picks(np.array(indices, dtype=np.int64), np.array(distance), np.array(factors))
