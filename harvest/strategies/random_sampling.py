"""random: a uniform draw without replacement (``numpy.random.default_rng(seed).choice``).

The module is named ``random_sampling`` so that it can never shadow the standard library's ``random``.
"""

from __future__ import annotations

import numpy as np

from .base import Context, Pool, Selection, Strategy


class RandomStrategy(Strategy):
    name = "random"

    def _select(self, pool: Pool, budget: int, seed: int, context: Context) -> Selection:
        rng = np.random.default_rng(seed)
        indices = rng.choice(len(pool), size=budget, replace=False)
        return Selection(indices, [f"random: uniform draw without replacement (seed {seed})"] * budget)
