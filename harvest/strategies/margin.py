"""margin: the B items with the smallest gap between the two largest softmax probabilities (over all of
the model's outputs). A single-output model has no second class: every margin is 1."""

from __future__ import annotations

import numpy as np

from .base import Context, Pool, Selection, Strategy, softmax, top_k


class MarginStrategy(Strategy):
    name = "margin"

    def _select(self, pool: Pool, budget: int, seed: int, context: Context) -> Selection:
        p = softmax(pool.logits)
        if p.shape[1] < 2:
            margin = np.ones(len(pool))
        else:
            two = np.partition(p, p.shape[1] - 2, axis=1)[:, -2:]
            margin = two[:, 1] - two[:, 0]
        indices = top_k(-margin, budget)
        return Selection(indices, [f"margin: top-2 probability margin {margin[i]:.3f}" for i in indices])
