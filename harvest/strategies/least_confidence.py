"""least-confidence: the B items whose top softmax probability (over all outputs) is lowest."""

from __future__ import annotations

from .base import Context, Pool, Selection, Strategy, softmax, top_k


class LeastConfidenceStrategy(Strategy):
    name = "least-confidence"

    def _select(self, pool: Pool, budget: int, seed: int, context: Context) -> Selection:
        confidence = softmax(pool.logits).max(axis=1)
        indices = top_k(-confidence, budget)
        return Selection(indices, [f"least-confidence: top probability {confidence[i]:.3f}" for i in indices])
