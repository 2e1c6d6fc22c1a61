"""open-quota: oodguard's open-set selection. It keeps the items judged known, splits the batch over the known
classes by quotas, and within each class takes the most surprising of its most known-like items, spread out.

Why: uncertainty strategies (sisom-diverse) pick informative images, and the known ones among them teach the
classifier most, but they spend most of the budget on unknowns; known-probability strategies (LfOSA, JSOSAL)
pick known images, but the confident, redundant ones, and they starve classes. The highest-SISOMe items that
still look known are the informative ones, and they are also where the unknowns are. So "is it known?" and "is
it informative?" are answered with *different* evidence, and how far the selection reaches into the surprising
region grows with the evidence about unknowns that the labels have brought. Measurements:
docs/benchmarks.md#open_quota-open-set-benchmark.

1. **Filter.** An item passes when
   - *score gate*: the conformal p-value of its pool score (params ``score``, default ``sisome``, else
     ``sisom``) among the context's held-out labeled ID scores (the calibration file's),
     π(x) = (1 + #{ID scores ≥ s(x)}) / (n + 1), is above params ``alpha`` (default 0.05, the gateway's
     95%-TPR threshold). It is skipped without ID scores (the reasons say so);
   - *unknown head*: once there are labeled unknowns, the known-class probability of the class-weighted
     (K+1)-way head (:mod:`._open_head`, as JSOSAL's) is at least params ``min_known`` (default 0.9);
   - the served model does not predict "unknown" (``context.unknown_label``).
2. **Quotas.** The passing items are grouped by the served model's predicted known class, and the budget is
   split by water-filling towards equal labeled counts (``context.labeled_labels``; :mod:`._quotas`), so no
   known class starves.
3. **Slice.** The candidates of class c are its k_eff · quota_c most known-like passing items. Known-likeness
   is the sum of the pool ranks of ``score`` and of params ``slice_score`` (default ``knn``, ``none`` for the
   score alone). Both are feature-space distances and neither is a logit, so unknowns with high top logits do
   not fool them, and the two disagree on different items, so their sum keeps more known items than either.
   The slice widens with the labeled unknowns U the head learns from: k_eff = params ``k`` (default 30) ×
   (1 + U / params ``widen``, default 40). Early, the slice keeps the batch known-like; later, the head does.
4. **Ranking.** Within the slice, by params ``rank`` (default ``margin``): the known-class *margin* (top-1
   minus top-2 softmax probability over the known classes; the smallest, i.e. the image the classifier
   confuses most between two known classes, first) or ``score`` (the score's percentile: the most
   surprising first), with sisome-diverse's greedy distance discount (:mod:`._diversity`). ρ = the
   candidates' median pairwise distance × params ``radius_scale``, or params ``radius``. Why margin: the
   filter and the slice already answer "is it known?"; among items judged known, the ones that teach the
   classifier most are those it confuses, and a confusion between two *known* classes is not evidence of an
   unknown, so the ranking does not pull the batch back towards the unknowns.
5. When fewer items pass than the budget, the rest are the other items most likely known (π · head p_known,
   descending; ties by index), and each of their reasons says "filler".

**What it needs from the retraining.** The strategy picks; the known-class accuracy it buys depends on what
the retrain does with the labels. A retrain that also trains the images labeled unknown, as a (K+1)-th class
whose output is then dropped (``oodguard train --outlier-data``, with ``labels import --not-relevant-out``),
teaches the backbone's features where the unknowns lie, and gains more over random than one that leaves them
out. Defaults were chosen on the default benchmark pool only (seeds 0-2; see the closing note of issue 17); the
second pool (``bench/unknown_pools.py``) was not used for tuning.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._diversity import greedy_diverse
from ._open_head import HEAD_PARAMS, Detector, detector
from ._quotas import water_fill
from .base import (Context, Pool, Selection, Strategy, known_logits, l2_normalise, require_score, softmax,
                   top2_margin)
from .sisom import sisom_score_name
from .sisom_diverse import describe_pick, percentile, radius_for


def conformal_p(score: np.ndarray, id_scores: np.ndarray) -> np.ndarray:
    """π = (1 + #{id ≥ s}) / (n + 1) per score (higher = more OOD convention); NaN scores get 0."""
    ordered = np.sort(np.asarray(id_scores, dtype=np.float64))
    at_least = len(ordered) - np.searchsorted(ordered, score, side="left")
    return np.where(np.isnan(score), 0.0, (1.0 + at_least) / (len(ordered) + 1.0))


def rank01(score: np.ndarray) -> np.ndarray:
    """Rank of each score in [0, 1) (0 = lowest; ties by index; NaN last)."""
    order = np.argsort(np.where(np.isnan(score), np.inf, score), kind="stable")
    rank = np.empty(len(score))
    rank[order] = np.arange(len(score)) / max(len(score), 1)
    return rank


@dataclass
class KnownFilter:
    passed: np.ndarray  # [N] bool
    p_value: np.ndarray  # [N] conformal p-value of the score (1 without ID scores)
    p_head: np.ndarray  # [N] the head's known-class probability (1 without a head)
    view: Detector
    gate: str  # how the p-value was obtained, for the reasons


def known_filter(pool: Pool, context: Context, seed: int, score_name: str, score: np.ndarray,
                 predicted_unknown: np.ndarray) -> KnownFilter:
    """Step 1 of the module docstring."""
    params = context.params
    id_scores = (context.id_scores or {}).get(score_name)
    if id_scores is not None and len(id_scores):
        p_value = conformal_p(score, id_scores)
        gate, note = p_value > float(params.get("alpha", 0.05)), f"of {score_name} among {len(id_scores)} held-out ID scores"
    else:
        p_value = np.ones(len(pool))
        gate, note = np.ones(len(pool), dtype=bool), f"(no score gate: no id_scores[{score_name!r}])"
    view = detector(pool, context, seed, balanced=True)
    p_head = softmax(view.pool.logits)[:, :-1].sum(axis=1) if view.trained else np.ones(len(pool))
    head_ok = p_head >= float(params.get("min_known", 0.9)) if view.trained else np.ones(len(pool), dtype=bool)
    return KnownFilter(gate & head_ok & ~predicted_unknown & ~np.isnan(score), p_value, p_head, view, note)


class OpenQuotaStrategy(Strategy):
    name = "open-quota"
    params = {"score": "pool score of the gate, the slice and the ranking (default sisome, else sisom)",
              "alpha": "conformal p-value at or below which the score gate calls an item unknown (default 0.05)",
              "min_known": "known-class probability of the (K+1)-way head below which an item is unknown (default 0.9)",
              "k": "candidates per class = k_eff x its quota, k_eff = k x (1 + labeled unknowns / widen) (default 30)",
              "widen": "labeled unknowns per extra k of the slice (default 40)",
              "slice_score": "pool score whose rank is added to the score's to order the slice, or none (default knn)",
              "radius": "diversity radius in feature space (default: the candidates' median pairwise distance x radius_scale)",
              "radius_scale": "factor on the computed radius (default 1.0)",
              "rank": "what ranks the slice: score (its percentile) or margin (known-class top-2 probability margin, "
                      "smallest first) (default margin)", **HEAD_PARAMS}

    def _select(self, pool: Pool, budget: int, seed: int, context: Context) -> Selection:
        params = context.params
        score_name = sisom_score_name(pool, context)
        score = require_score(pool, score_name, self.name)
        known, predicted_unknown, k = known_logits(pool, context)
        predicted = known.argmax(axis=1) if k else np.zeros(len(pool), dtype=np.int64)
        found = known_filter(pool, context, seed, score_name, score, predicted_unknown)

        labels = context.labeled_labels
        counts = (np.bincount(np.asarray(labels, np.int64), minlength=k)[:k] if labels is not None and len(labels)
                  else np.zeros(k, np.int64))
        quotas = water_fill(counts, np.bincount(predicted[found.passed], minlength=k)[:k], budget)

        n_unknown = len(context.unknown_features) if found.view.trained else 0
        k_eff = float(params.get("k", 30)) * (1.0 + n_unknown / float(params.get("widen", 40)))
        second = str(params.get("slice_score", "knn"))
        likeness = rank01(score) + (rank01(require_score(pool, second, self.name)) if second != "none" else 0.0)
        rank_by = str(params.get("rank", "margin"))
        if rank_by == "margin":  # known-class confusion: a small top-2 probability margin ranks first
            rank_value = -top2_margin(known)
        elif rank_by == "score":
            rank_value = score
        else:
            raise ValueError(f"open-quota: rank must be score or margin, got {rank_by!r}")
        groups = np.full(len(pool), -1, dtype=np.int64)
        value = np.zeros(len(pool))
        for c in np.flatnonzero(quotas):
            members = np.flatnonzero(found.passed & (predicted == c))
            kept = members[np.argsort(likeness[members], kind="stable")[:max(int(quotas[c]), int(np.ceil(k_eff * quotas[c])))]]
            groups[kept] = c
            value[kept] = percentile(rank_value[kept])

        x = l2_normalise(pool.features)
        rows = np.flatnonzero(groups >= 0)
        radius = radius_for(x[rows], seed, context) if len(rows) else 0.0
        picks = greedy_diverse(x, value, radius, int(quotas.sum()), groups, quotas)
        size = np.bincount(groups[rows], minlength=k)
        chosen = picks.indices.tolist()
        reasons = [f"open-quota: class {predicted[i]} (quota {quotas[predicted[i]]}, {counts[predicted[i]]} labeled), "
                   f"{score_name} {score[i]:.4g}, {rank_by} percentile {value[i]:.3f} among the class's {size[predicted[i]]} "
                   f"candidates (k_eff {k_eff:.1f}; {int(found.passed.sum())} items passed), p-value "
                   f"{found.p_value[i]:.3f} {found.gate}, head p_known {found.p_head[i]:.3f}; "
                   f"{describe_pick(picks, j, radius)}; {found.view.note}" for j, i in enumerate(chosen)]
        if len(chosen) < budget:
            rest = np.flatnonzero(~np.isin(np.arange(len(pool)), chosen))
            order = rest[np.argsort(-(found.p_value * found.p_head)[rest], kind="stable")][:budget - len(chosen)]
            chosen.extend(order.tolist())
            reasons.extend(f"open-quota: filler ({int(found.passed.sum())} passed < budget {budget}), most likely known: "
                           f"p-value {found.p_value[i]:.3f} {found.gate}, head p_known {found.p_head[i]:.3f}; "
                           f"{found.view.note}" for i in order)
        return Selection(np.array(chosen, dtype=np.int64), reasons)
