"""coreset: k-center greedy (Sener & Savarese 2018) on L2-normalised features.

Each step takes the pool item farthest (Euclidean, on the unit sphere) from its nearest centre, then makes
it a centre. The labeled set's features (``context.labeled_features``) are the initial centres; without a
labeled set the first pick is the item farthest from the pool's mean direction (deterministic).

Cost is O(B·N·D) plus O(N·M·D) for the labeled centres, so large inputs are subsampled (seeded):

- params ``max_pool`` (default 20000): the pool is subsampled to at most ``max(max_pool, B)`` items and
  only those can be picked — the reasons say so;
- params ``max_labeled`` (default 20000): at most that many labeled centres are used.
"""

from __future__ import annotations

import numpy as np

from .base import Context, Pool, Selection, Strategy, l2_normalise, pool_subsample, subsample


def _min_sq_distance(x: np.ndarray, centres: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """min_j ||x_i - c_j||² for unit vectors (= 2 - 2 max_j <x_i, c_j>), chunked over the centres."""
    best = np.full(len(x), -np.inf, dtype=np.float32)
    for start in range(0, len(centres), chunk):
        np.maximum(best, (x @ centres[start:start + chunk].T).max(axis=1), out=best)
    return np.maximum(2.0 - 2.0 * best.astype(np.float64), 0.0)


class CoresetStrategy(Strategy):
    name = "coreset"
    params = {"max_pool": "pool subsample size (default 20000)", "max_labeled": "labeled centres used (default 20000)"}

    def _select(self, pool: Pool, budget: int, seed: int, context: Context) -> Selection:
        rng = np.random.default_rng(seed)
        sub, note = pool_subsample(len(pool), budget, context, rng)
        x = l2_normalise(pool.features[sub])
        labeled = context.labeled_features
        if labeled is not None and len(labeled):
            labeled = np.asarray(labeled, dtype=np.float32).reshape(len(labeled), -1)
            if labeled.shape[1] != x.shape[1]:
                raise ValueError(f"context.labeled_features has dim {labeled.shape[1]}, pool features {x.shape[1]}")
            keep = subsample(len(labeled), int(context.params.get("max_labeled", 20000)), rng)
            if len(keep) < len(labeled):
                note += f"; labeled centres subsampled to {len(keep)} of {len(labeled)}"
            d2 = _min_sq_distance(x, l2_normalise(labeled[keep]))
            origin = "labeled/selected"
        else:
            mean = x.mean(axis=0)
            d2 = ((x - mean) ** 2).sum(axis=1).astype(np.float64)
            origin = "selected (no labeled set; first pick: farthest from the pool mean)"
        chosen = np.empty(budget, dtype=np.int64)
        distance = np.empty(budget)
        for step in range(budget):
            pick = int(np.argmax(d2))
            chosen[step], distance[step] = pick, np.sqrt(d2[pick])
            np.minimum(d2, np.maximum(2.0 - 2.0 * (x @ x[pick]).astype(np.float64), 0.0), out=d2)
            d2[chosen[:step + 1]] = -1.0  # never re-pick, even when every distance is 0
        return Selection(sub[chosen], [f"coreset: k-center greedy pick {step + 1}, distance {distance[step]:.3f} "
                                       f"to the nearest {origin} centre{note}" for step in range(budget)])
