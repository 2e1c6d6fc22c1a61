"""jsosal: JSOSAL selection (Zhang et al., PMLR 278, 2025): p_known from a per-class 2-component
``BayesianGaussianMixture`` on the max activation values of the class-weighted (K+1)-way detector
(:mod:`._open_head`, weights ``w_c = N / n_c``; the pool's own logits without labeled unknowns, the
"MAV-only" variant), with the unimodal guard (see :mod:`._mixture`); the top a = min(k·B, N) items by p_known
(ties by MAV, then index), then the top B of those by predictive entropy of the detector's softmax over the
known classes only (ties by the p_known rank).

The paper does not state a — **choice**: a = k·B with params ``k`` (default 4; the reference MNIST run
used a = 4B).
"""

from __future__ import annotations

import numpy as np

from ._mixture import MIXTURE_PARAMS, describe, fit_p_known, rank_by_p_known
from ._open_head import HEAD_PARAMS, detector
from .base import Context, Pool, Selection, Strategy, entropy, softmax


class JsosalStrategy(Strategy):
    name = "jsosal"
    params = {"k": "candidates a = k x budget (default 4)", **MIXTURE_PARAMS, **HEAD_PARAMS}

    def _select(self, pool: Pool, budget: int, seed: int, context: Context) -> Selection:
        k = float(context.params.get("k", 4))
        view = detector(pool, context, seed, balanced=True)
        result = fit_p_known(view.pool, seed, view.context, bayesian=True)
        a = int(min(max(round(k * budget), budget), len(pool)))
        candidates = rank_by_p_known(result)[:a]
        h = entropy(softmax(result.known[candidates])) if result.known.shape[1] else np.zeros(a)
        order = np.argsort(-h, kind="stable")[:budget]
        indices = candidates[order]
        return Selection(indices, [f"jsosal: entropy over known classes {h[j]:.3f} nats, rank {rank + 1} of "
                                   f"the top a={a} by p_known; {describe(result, candidates[j])}; {view.note}"
                                   for rank, j in enumerate(order)])
