"""The (K+1)-way detector of LfOSA, JSOSAL and open-quota: a linear head with an "unknown" class, trained on
what the harvest has labeled so far.

LfOSA and JSOSAL train their detector with K+1 outputs on the labeled known samples plus the queried samples
the annotator marked unknown (class K+1). Here that detector is a multinomial ``LogisticRegression`` on the
pool's penultimate features (standardised on the training rows), not a retrained backbone — a **choice**:

- the harvest sees features, not the network: retraining the backbone with K+1 outputs belongs to the
  training job, and the served model would then carry the unknown output itself (``context.unknown_label``);
- a linear head on the served features is cheap (a few hundred rows, under a second), deterministic given
  the seed, and needs no export; it learns *where in feature space* the labeled unknowns lie, which is what
  the K-way logits cannot express (an unknown with a high top logit stays "known" for MAV-only).

Training: rows = ``context.labeled_features`` (labels ``context.labeled_labels`` in 0..K−1) and
``context.unknown_features`` (class K). LfOSA's cross-entropy on logits/T (T = 0.5) is, for a linear head,
the same model family with weights scaled by 1/T, so T is absorbed into the L2 strength (params ``head_c``,
default 1.0, scikit-learn's C). JSOSAL's class weights ``w_c = N / n_c`` are passed as sample weights
(``balanced=True``). A known class without labeled rows gets no output from the fit; its column is set below
every other logit (never predicted). The head's logits (``decision_function``; for two classes, ``[0, d]``)
replace the pool's logits, with ``unknown_label = K``.

The head needs at least one labeled known and one labeled unknown row; otherwise (e.g. the first round) the
pool's own logits are used unchanged — the "MAV-only" variant — and the note says so. params ``head``:
``"auto"`` (default, the above) or ``"mav"`` (always the pool's logits).
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass

import numpy as np

from .base import Context, Pool, num_known

#: the parameters of the detector (lfosa, jsosal, open-quota)
HEAD_PARAMS = {"head": "auto: (K+1)-way head when labeled unknowns are given; mav: the pool's logits (default auto)",
               "head_c": "inverse L2 strength of the (K+1)-way logistic head (default 1.0)"}


@dataclass
class Detector:
    """The pool and context to select on (the head's logits with ``unknown_label = K``, or the originals),
    ``trained`` (whether the head exists) and a note for the reasons."""

    pool: Pool
    context: Context
    trained: bool
    note: str


def training_rows(context: Context, k: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(features, labels with K = unknown), or None when there are no labeled unknowns or no labeled knowns."""
    unknown = context.unknown_features
    known = context.labeled_features
    if unknown is None or known is None or len(unknown) == 0 or len(known) == 0:
        return None
    labels = np.asarray(context.labeled_labels, dtype=np.int64).reshape(-1)
    if len(labels) != len(known) or labels.min() < 0 or labels.max() >= k:
        raise ValueError(f"context.labeled_labels must be {len(known)} known-class indices in 0..{k - 1}")
    x = np.concatenate([np.asarray(known, np.float64), np.asarray(unknown, np.float64)])
    return x, np.concatenate([labels, np.full(len(unknown), k, dtype=np.int64)])


def fit_head(x: np.ndarray, y: np.ndarray, seed: int, c: float, balanced: bool):
    """The fitted scikit-learn pipeline (standardise, multinomial logistic regression)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    counts = np.bincount(y)
    weights = (len(y) / counts[y]) if balanced else None  # JSOSAL: w_c = N / n_c
    model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000, random_state=seed))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence warnings on separable toy data
        model.fit(x, y, logisticregression__sample_weight=weights)
    return model


def head_logits(model, features: np.ndarray, k: int) -> np.ndarray:
    """``[N, K+1]`` logits of the head (column K = unknown); classes the fit never saw get the row minimum − 10."""
    classes = model.classes_
    d = model.decision_function(np.asarray(features, np.float64))
    if len(classes) == 2:
        d = np.stack([np.zeros(len(d)), d], axis=1)
    logits = np.empty((len(features), k + 1))
    logits[:] = (d.min(axis=1) - 10.0)[:, None]
    logits[:, classes] = d
    return logits


def detector(pool: Pool, context: Context, seed: int, balanced: bool) -> Detector:
    """The (K+1)-way head's view of the pool when it can be trained (see the module docstring), else the pool's."""
    mode = str(context.params.get("head", "auto"))
    if mode not in ("auto", "mav"):
        raise ValueError(f"params head must be 'auto' or 'mav', got {mode!r}")
    k = num_known(pool, context)
    rows = training_rows(context, k) if mode == "auto" else None
    if rows is None:
        why = "head=mav" if mode == "mav" else "no labeled unknowns (or knowns) in the context"
        return Detector(pool, context, False, f"MAV-only on the pool's logits ({why})")
    x, y = rows
    model = fit_head(x, y, seed, float(context.params.get("head_c", 1.0)), balanced)
    logits = head_logits(model, pool.features, k)
    view = Pool(pool.ids, pool.features, logits, pool.scores)
    n_unknown = int((y == k).sum())
    note = (f"(K+1)-way head on {len(y) - n_unknown} labeled known + {n_unknown} labeled unknown"
            + (", class-weighted" if balanced else ""))
    return Detector(view, dataclasses.replace(context, known_classes=k, unknown_label=k), True, note)
