"""margin: the B items with the smallest gap between the two largest softmax probabilities (over all of
the model's outputs). A single-output model has no second class: every margin is 1."""

from __future__ import annotations

from .base import Context, Pool, Selection, Strategy, top2_margin, top_k


class MarginStrategy(Strategy):
    name = "margin"

    def _select(self, pool: Pool, budget: int, seed: int, context: Context) -> Selection:
        margin = top2_margin(pool.logits)
        indices = top_k(-margin, budget)
        return Selection(indices, [f"margin: top-2 probability margin {margin[i]:.3f}" for i in indices])
