"""lfosa: LfOSA selection (Ning et al., CVPR 2022): the global top B by p_known, the posterior of the
higher-mean component of a per-class 2-component ``GaussianMixture`` on the max activation values of the
(K+1)-way detector (:mod:`._open_head`: trained on the labeled knowns and the labeled unknowns of the
context), with oodguard's unimodal guard (see :mod:`._mixture` for MAV, the guard and its params). Items the
detector predicts "unknown" get p_known 0. Ties in p_known are broken by MAV (higher first), then pool index.
Without labeled unknowns (or with params ``head=mav``) the pool's own logits are used: with a K-way model
this is the "MAV-only" variant.
"""

from __future__ import annotations

from ._mixture import MIXTURE_PARAMS, describe, fit_p_known, rank_by_p_known
from ._open_head import HEAD_PARAMS, detector
from .base import Context, Pool, Selection, Strategy


class LfosaStrategy(Strategy):
    name = "lfosa"
    params = {**MIXTURE_PARAMS, **HEAD_PARAMS}

    def _select(self, pool: Pool, budget: int, seed: int, context: Context) -> Selection:
        view = detector(pool, context, seed, balanced=False)
        result = fit_p_known(view.pool, seed, view.context, bayesian=False)
        indices = rank_by_p_known(result)[:budget]
        return Selection(indices, [f"lfosa: rank {rank + 1} by p_known; {describe(result, i)}; {view.note}"
                                   for rank, i in enumerate(indices)])
