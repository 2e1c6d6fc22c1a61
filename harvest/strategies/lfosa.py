"""lfosa: LfOSA selection (Ning et al., CVPR 2022): the global top B by p_known, the posterior of the
higher-mean component of a per-class 2-component ``GaussianMixture`` on the max activation values, with
oodguard's unimodal guard (see :mod:`._mixture` for MAV, the guard and its params). Ties in p_known are
broken by MAV (higher first), then pool index. Without an "unknown" output (``context.unknown_label``
None) this is the "MAV-only" variant.
"""

from __future__ import annotations

from ._mixture import MIXTURE_PARAMS, describe, fit_p_known, rank_by_p_known
from .base import Context, Pool, Selection, Strategy


class LfosaStrategy(Strategy):
    name = "lfosa"
    params = dict(MIXTURE_PARAMS)

    def _select(self, pool: Pool, budget: int, seed: int, context: Context) -> Selection:
        result = fit_p_known(pool, seed, context, bayesian=False)
        indices = rank_by_p_known(result)[:budget]
        return Selection(indices, [f"lfosa: rank {rank + 1} by p_known; {describe(result, i)}"
                                   for rank, i in enumerate(indices)])
