"""sisom: SISOM for active learning (Schmidt et al., TMLR 2025, section 6 of the method note) — the top-B
items by the fused head's score, descending, no diversity step.

params ``score``: which pool score to rank by; default ``"sisome"`` when the pool has it, else ``"sisom"``.
"""

from __future__ import annotations

from .base import Context, Pool, Selection, Strategy, require_score, top_k


def sisom_score_name(pool: Pool, context: Context) -> str:
    name = context.params.get("score")
    if name is None:
        name = "sisome" if "sisome" in pool.scores else "sisom"
    return str(name)


class SisomStrategy(Strategy):
    name = "sisom"
    params = {"score": "pool score to rank by (default sisome, else sisom)"}

    def _select(self, pool: Pool, budget: int, seed: int, context: Context) -> Selection:
        score_name = sisom_score_name(pool, context)
        score = require_score(pool, score_name, self.name)
        indices = top_k(score, budget)
        return Selection(indices, [f"sisom: rank {rank + 1} by {score_name} {score[i]:.4g}"
                                   for rank, i in enumerate(indices)])
