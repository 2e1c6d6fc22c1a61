"""entropy: the top-B items by predictive entropy of ``softmax(logits)`` over all of the model's outputs
(including an "unknown" output if it has one), in nats."""

from __future__ import annotations

import numpy as np

from .base import Context, Pool, Selection, Strategy, entropy, softmax, top_k


class EntropyStrategy(Strategy):
    name = "entropy"

    def _select(self, pool: Pool, budget: int, seed: int, context: Context) -> Selection:
        h = entropy(softmax(pool.logits))
        indices = top_k(h, budget)
        ceiling = np.log(pool.logits.shape[1])
        return Selection(indices, [f"entropy: predictive entropy {h[i]:.3f} nats (max {ceiling:.3f})" for i in indices])
