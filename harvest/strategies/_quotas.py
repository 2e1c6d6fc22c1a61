"""Per-class quotas so that no known class starves (EAOA-style; the water-filling rule is oodguard's **choice**).

Ranking globally by a known-probability fills the batch with the classes the model is most confident about
(the reference MNIST run: LfOSA queried no digit-1 image in any seed). Instead the batch is split over the
predicted known classes by **water-filling towards equal labeled counts**: one slot at a time goes to the
class whose labeled count plus quota so far is smallest (ties: lowest class index), among the classes that
still have candidates left. A class with few labels therefore gets most of the batch until it catches up;
with equal counts the batch is split evenly. When the candidates of all classes together are fewer than the
budget, every candidate is taken (the quotas are the availabilities) and the caller fills the rest.
"""

from __future__ import annotations

import numpy as np


def water_fill(counts: np.ndarray, available: np.ndarray, budget: int) -> np.ndarray:
    """Quotas ``[K]`` with ``sum = min(budget, sum(available))`` and ``quota ≤ available`` per class."""
    counts = np.asarray(counts, dtype=np.int64)
    available = np.asarray(available, dtype=np.int64)
    if counts.shape != available.shape:
        raise ValueError(f"counts {counts.shape} and available {available.shape} must have the same shape")
    quotas = np.zeros_like(available)
    for _ in range(int(min(budget, available.sum()))):
        level = np.where(quotas < available, counts + quotas, np.iinfo(np.int64).max)
        quotas[int(np.argmin(level))] += 1
    return quotas
