"""The per-class two-component mixture on max activation values (MAVs) shared by LfOSA and JSOSAL, with the
**unimodal guard**.

For each item: c = argmax of the model's outputs, MAV = max logit over the known classes. Items predicted
"unknown" (``context.unknown_label``) get p_known = 0. For each predicted known class with ≥ 2 members a
2-component mixture is fitted on its MAVs; p_known = posterior of the component with the higher mean.

Guard (params ``ashman_d``, default 2; ``min_weight``, default 0.05): when the two components are not
separated — Ashman's D = √2·|μ1 − μ2| / √(σ1² + σ2²) below ``ashman_d``, or the smaller weight below
``min_weight`` — the class is treated as one component, p_known = 1 for all its items. A class whose MAVs
are all equal is unimodal without a fit; a class with one member has p_known = 1. A class with more than
params ``max_fit`` (default 5000) members is fitted on a seeded subsample of that many MAVs (a 1-D,
2-component fit needs no more) and the posterior is evaluated on all of them. The note of each class
says which applied. (The reference MNIST run found the guard firing mostly on *mixed* classes, so a fired
guard does not prove a class is pure: it only stops the mixture from calling half of a class unknown.)
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from .base import Context, Pool, known_logits


#: the parameters of the mixture fit (lfosa, jsosal)
MIXTURE_PARAMS = {"ashman_d": "unimodal guard: Ashman's D below which the fit is refused (default 2)",
                  "min_weight": "unimodal guard: smallest component weight (default 0.05)",
                  "max_fit": "MAVs fitted per class at most (default 5000)", "max_iter": "EM iterations (default 200)",
                  "n_init": "EM restarts (default 1)"}


@dataclass
class MixtureResult:
    p_known: np.ndarray  # [N]
    mav: np.ndarray  # [N]
    predicted: np.ndarray  # [N] known-class index (−1 = predicted unknown)
    known: np.ndarray  # [N, K] logits over the known classes
    notes: dict[int, str]  # class → how p_known was obtained
    guarded: set[int]


def ashman_d(means: np.ndarray, variances: np.ndarray) -> float:
    return float(np.sqrt(2.0) * abs(means[0] - means[1]) / np.sqrt(max(variances[0] + variances[1], 1e-300)))


def fit_p_known(pool: Pool, seed: int, context: Context, bayesian: bool) -> MixtureResult:
    from sklearn.mixture import BayesianGaussianMixture, GaussianMixture

    params = context.params
    d_min = float(params.get("ashman_d", 2.0))
    w_min = float(params.get("min_weight", 0.05))
    max_fit = int(params.get("max_fit", 5000))
    rng = np.random.default_rng(seed)
    known, predicted_unknown, k = known_logits(pool, context)
    known = known.astype(np.float64)
    predicted = known.argmax(axis=1) if k else np.zeros(len(pool), dtype=np.int64)
    predicted = np.where(predicted_unknown, -1, predicted)
    mav = known.max(axis=1) if k else np.zeros(len(pool))
    p_known = np.zeros(len(pool))
    notes: dict[int, str] = {}
    guarded: set[int] = set()
    kind = "BayesianGaussianMixture" if bayesian else "GaussianMixture"
    for c in np.unique(predicted[predicted >= 0]):
        members = np.flatnonzero(predicted == c)
        values = mav[members]
        if len(members) < 2:
            p_known[members] = 1.0
            notes[int(c)] = "single member: p_known 1"
            continue
        if np.ptp(values) == 0:
            p_known[members] = 1.0
            guarded.add(int(c))
            notes[int(c)] = "unimodal guard: all MAVs equal, one component (p_known 1)"
            continue
        common = dict(n_components=2, random_state=seed, max_iter=int(params.get("max_iter", 200)))
        if bayesian:
            model = BayesianGaussianMixture(n_init=int(params.get("n_init", 1)), **common)
        else:
            model = GaussianMixture(n_init=int(params.get("n_init", 1)), **common)
        fit_rows = values if len(values) <= max_fit else values[np.sort(rng.choice(len(values), max_fit, replace=False))]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # convergence warnings on tiny classes
            model.fit(fit_rows.reshape(-1, 1))
        means = model.means_.reshape(-1)
        variances = model.covariances_.reshape(-1)
        weights = model.weights_.reshape(-1)
        d = ashman_d(means, variances)
        if d < d_min or weights.min() < w_min:
            p_known[members] = 1.0
            guarded.add(int(c))
            why = f"Ashman's D {d:.2f} < {d_min:g}" if d < d_min else f"smaller weight {weights.min():.3f} < {w_min:g}"
            notes[int(c)] = f"unimodal guard: {why} (D {d:.2f}, weights {weights.min():.2f}/{weights.max():.2f}), one component (p_known 1)"
            continue
        high = int(np.argmax(means))
        p_known[members] = model.predict_proba(values.reshape(-1, 1))[:, high]
        notes[int(c)] = (f"2-component {kind} (means {means.min():.3g}/{means.max():.3g}, D {d:.2f}, "
                         f"weight of the high-mean component {weights[high]:.2f})")
    return MixtureResult(p_known, mav, predicted, known, notes, guarded)


def describe(result: MixtureResult, i: int) -> str:
    c = int(result.predicted[i])
    if c < 0:
        return "predicted unknown: p_known 0"
    return f"class {c}, MAV {result.mav[i]:.3g}, p_known {result.p_known[i]:.3f} ({result.notes[c]})"


def rank_by_p_known(result: MixtureResult) -> np.ndarray:
    """All indices by p_known descending; ties (e.g. a guarded class, all 1) by MAV descending, then index."""
    n = len(result.p_known)
    return np.lexsort((np.arange(n), -result.mav, -result.p_known))
