"""sisom-diverse: SISOM ranking with a greedy diversity rule (the paper leaves batch diversity as future work;
this rule is oodguard's **choice**, measured against plain top-B in the tests).

Idea: each pick joins the bank, so items close to it are no longer surprising. SISOM's ratio
``r = d_in / d_out`` drops for such an item to about (distance to the pick) / (distance between classes).
Scale-free version of that, greedy:

- ``q(x)`` = score percentile in (0, 1] (1 = highest ``sisome`` if present else ``sisom``; params
  ``score``; NaN ranks last);
- ``d(x)`` = Euclidean distance from x to its nearest pick, on L2-normalised features (∞ before the first);
- next pick = argmax of ``q(x) · min(1, d(x) / ρ)`` (ties: lowest index).

ρ (params ``radius``, else computed) = the median pairwise distance of a seeded sample of at most 2000 pool
items (the pool's typical spread; between-cluster scale when the pool has several clusters), times params
``radius_scale`` (default 1). ``radius`` 0 disables the penalty (plain top-B). Items within ρ of a pick are
discounted in proportion to their closeness; the first pick is always the top score. Cost O(B·N·D).

A first version deferred items closer than the median nearest-neighbour distance of a random B-batch; in
84-dimensional features within-cluster distances concentrate, so half of a cluster lay outside any such
ball and the batch still came from one cluster — the proportional discount with a pool-scale ρ does not.
"""

from __future__ import annotations

import numpy as np

from .base import Context, Pool, Selection, Strategy, l2_normalise, require_score
from .sisom import sisom_score_name


def pool_spread(x: np.ndarray, rng: np.random.Generator, limit: int = 2000) -> float:
    """Median pairwise Euclidean distance of (a seeded sample of at most ``limit``) unit rows."""
    sample = x if len(x) <= limit else x[rng.choice(len(x), size=limit, replace=False)]
    d2 = np.maximum(2.0 - 2.0 * (sample @ sample.T).astype(np.float64), 0.0)
    upper = d2[np.triu_indices(len(sample), k=1)]
    return float(np.sqrt(np.median(upper))) if len(upper) else 0.0


class SisomDiverseStrategy(Strategy):
    name = "sisom-diverse"
    params = {"score": "pool score to rank by (default sisome, else sisom)",
              "radius": "diversity radius in feature space (default: the pool's median pairwise distance x radius_scale)",
              "radius_scale": "factor on the computed radius (default 1.0)"}

    def _select(self, pool: Pool, budget: int, seed: int, context: Context) -> Selection:
        score_name = sisom_score_name(pool, context)
        score = require_score(pool, score_name, self.name)
        x = l2_normalise(pool.features)
        n = len(pool)
        if context.params.get("radius") is not None:
            radius = float(context.params["radius"])
        else:
            radius = pool_spread(x, np.random.default_rng(seed)) * float(context.params.get("radius_scale", 1.0))
        order = np.argsort(-np.where(np.isnan(score), -np.inf, score), kind="stable")
        rank = np.empty(n, dtype=np.int64)
        rank[order] = np.arange(n)
        q = (n - rank) / n  # percentile: top score 1, lowest 1/n
        factor = np.ones(n)
        d2 = np.full(n, np.inf)
        chosen, reasons = [], []
        for _ in range(budget):
            value = q * factor
            value[chosen] = -1.0
            pick = int(np.argmax(value))
            chosen.append(pick)
            near = "first pick" if not np.isfinite(d2[pick]) else f"distance {np.sqrt(d2[pick]):.3f} to the nearest pick"
            reasons.append(f"sisom-diverse: {score_name} {score[pick]:.4g} (rank {rank[pick] + 1}, percentile "
                           f"{q[pick]:.3f}), {near}, diversity factor {factor[pick]:.3f} (radius {radius:.3f})")
            np.minimum(d2, np.maximum(2.0 - 2.0 * (x @ x[pick]).astype(np.float64), 0.0), out=d2)
            if radius > 0:
                factor = np.minimum(1.0, np.sqrt(d2) / radius)
        return Selection(np.array(chosen, dtype=np.int64), reasons)
