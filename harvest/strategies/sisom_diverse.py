"""sisom-diverse: SISOM top-B with a greedy diversity rule (the paper leaves batch diversity as future work;
this is oodguard's **choice**, measured against plain top-B in the tests).

Rule: walk the pool in descending score order (``sisome`` if present else ``sisom``; params ``score``).
Each pick becomes a new bank member: an item within distance ρ of any earlier pick (Euclidean on
L2-normalised features) is redundant with it and is *deferred*; the next pick is the highest-scoring item
not within ρ of any pick. When no such item is left, the remaining slots are filled from the deferred
items in score order.

ρ (params ``radius``, else computed): the spacing a batch of B random picks would have — the median, over
5 seeded draws of ``min(max(B, 2), 2000, N)`` pool items, of those items' median nearest-neighbour distance
among themselves — times params ``radius_scale`` (default 1). So a batch can cover the pool about as
widely as a random batch, but it starts from the highest scores. Cost O(B·N·D).
"""

from __future__ import annotations

import numpy as np

from .base import Context, Pool, Selection, Strategy, l2_normalise, require_score
from .sisom import sisom_score_name


def batch_spacing(x: np.ndarray, budget: int, rng: np.random.Generator, draws: int = 5) -> float:
    """Median nearest-neighbour distance of random batches of size max(B, 2) (≤ 2000), median over draws."""
    size = min(max(budget, 2), 2000, len(x))
    medians = []
    for _ in range(draws):
        sample = x[rng.choice(len(x), size=size, replace=False)]
        d2 = np.maximum(2.0 - 2.0 * (sample @ sample.T).astype(np.float64), 0.0)
        np.fill_diagonal(d2, np.inf)
        medians.append(np.median(np.sqrt(d2.min(axis=1))))
    return float(np.median(medians))


class SisomDiverseStrategy(Strategy):
    name = "sisom-diverse"

    def _select(self, pool: Pool, budget: int, seed: int, context: Context) -> Selection:
        score_name = sisom_score_name(pool, context)
        score = require_score(pool, score_name, self.name)
        x = l2_normalise(pool.features)
        if context.params.get("radius") is not None:
            radius = float(context.params["radius"])
        else:
            radius = batch_spacing(x, budget, np.random.default_rng(seed)) * float(context.params.get("radius_scale", 1.0))
        order = np.argsort(-np.where(np.isnan(score), -np.inf, score), kind="stable")
        rank = np.empty(len(order), dtype=np.int64)
        rank[order] = np.arange(len(order))
        # nearest-pick squared distance per item; an item is free while it is >= radius² (picked: -1)
        d2 = np.full(len(pool), np.inf)
        limit = radius * radius
        chosen, reasons = [], []
        cursor = 0
        while len(chosen) < budget:
            while cursor < len(order) and not d2[order[cursor]] >= limit:
                cursor += 1
            if cursor == len(order):
                break
            pick = int(order[cursor])
            chosen.append(pick)
            nearest = np.sqrt(d2[pick]) if np.isfinite(d2[pick]) else None
            reasons.append(f"sisom-diverse: {score_name} {score[pick]:.4g} (rank {rank[pick] + 1}), "
                           + ("first pick" if nearest is None else f"distance {nearest:.3f} to the nearest pick")
                           + f" >= radius {radius:.3f}")
            np.minimum(d2, np.maximum(2.0 - 2.0 * (x @ x[pick]).astype(np.float64), 0.0), out=d2)
            d2[pick] = -1.0
        if len(chosen) < budget:  # everything left is within the radius of a pick: fill by score
            taken = np.zeros(len(pool), dtype=bool)
            taken[chosen] = True
            for pick in order[~taken[order]][:budget - len(chosen)]:
                chosen.append(int(pick))
                reasons.append(f"sisom-diverse: {score_name} {score[pick]:.4g} (rank {rank[pick] + 1}), fill by score: "
                               f"distance {np.sqrt(max(d2[pick], 0.0)):.3f} to the nearest pick < radius {radius:.3f}")
        return Selection(np.array(chosen, dtype=np.int64), reasons)
