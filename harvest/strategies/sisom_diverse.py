"""sisom-diverse: SISOM ranking with a greedy diversity rule (the paper leaves batch diversity as future work;
this rule is oodguard's **choice**, measured against plain top-B in the tests).

- ``q(x)`` = score percentile in (0, 1] (1 = highest ``sisome`` if present else ``sisom``; params
  ``score``; NaN ranks last);
- next pick = argmax of ``q(x) · min(1, d(x) / ρ)`` with ``d(x)`` the distance to the nearest pick (the rule
  and its reasoning: :mod:`._diversity`).

ρ (params ``radius``, else computed) = the median pairwise distance of a seeded sample of at most 2000 pool
items (the pool's typical spread; between-cluster scale when the pool has several clusters), times params
``radius_scale`` (default 1). ``radius`` 0 disables the penalty (plain top-B). Items within ρ of a pick are
discounted in proportion to their closeness; the first pick is always the top score. Cost O(B·N·D).

Why not a hard cut (defer items closer than the median nearest-neighbour distance of a random B-batch): in
84-dimensional features within-cluster distances concentrate, so half of a cluster lies outside any such
ball and the batch still comes from one cluster; the proportional discount with a pool-scale ρ does not.
"""

from __future__ import annotations

import numpy as np

from ._diversity import greedy_diverse, pool_spread
from .base import Context, Pool, Selection, Strategy, l2_normalise, require_score
from .sisom import sisom_score_name


def percentile(score: np.ndarray) -> np.ndarray:
    """Rank percentile in (0, 1]: the highest score 1, the lowest 1/n; NaN last; ties by index."""
    n = len(score)
    order = np.argsort(-np.where(np.isnan(score), -np.inf, score), kind="stable")
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    return (n - rank) / n


def radius_for(x: np.ndarray, seed: int, context: Context) -> float:
    """params ``radius``, else the pool spread of ``x`` times params ``radius_scale`` (default 1)."""
    if context.params.get("radius") is not None:
        return float(context.params["radius"])
    return pool_spread(x, np.random.default_rng(seed)) * float(context.params.get("radius_scale", 1.0))


def describe_pick(picks, j: int, radius: float) -> str:
    near = "first pick" if not np.isfinite(picks.distance[j]) else f"distance {picks.distance[j]:.3f} to the nearest pick"
    return f"{near}, diversity factor {picks.factor[j]:.3f} (radius {radius:.3f})"


class SisomDiverseStrategy(Strategy):
    name = "sisom-diverse"
    params = {"score": "pool score to rank by (default sisome, else sisom)",
              "radius": "diversity radius in feature space (default: the pool's median pairwise distance x radius_scale)",
              "radius_scale": "factor on the computed radius (default 1.0)"}

    def _select(self, pool: Pool, budget: int, seed: int, context: Context) -> Selection:
        score_name = sisom_score_name(pool, context)
        score = require_score(pool, score_name, self.name)
        x = l2_normalise(pool.features)
        radius = radius_for(x, seed, context)
        q = percentile(score)
        picks = greedy_diverse(x, q, radius, budget)
        return Selection(picks.indices, [
            f"sisom-diverse: {score_name} {score[i]:.4g} (rank {round((1 - q[i]) * len(pool)) + 1}, percentile "
            f"{q[i]:.3f}), {describe_pick(picks, j, radius)}" for j, i in enumerate(picks.indices)])
