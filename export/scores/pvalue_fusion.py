"""``fused``: complementary scores combined through their conformal p-values.

No single score wins both near and far OOD (the logit scores win far, the feature distances near), so the
default decision combines several. Each component score ``s_j`` becomes a conformal p-value against
*reference* in-distribution scores ``R_j`` (held-out calibration images, never training data):
``p_j = (1 + #{R_j >= s_j}) / (n + 1)``, computed inside the ONNX graph (the references are constants).
Past the largest reference ``r_max`` the log p-value continues along an exponential tail,
``log p = log(1 / (n + 1)) - (s - r_max) / tau`` (``tau``: the mean excess of the references over their 90th
percentile, the tail's maximum-likelihood scale, at least 1e-12; a NaN score gets ``-inf``): at the plain
floor ``1 / (n + 1)`` so many held-out images would tie that the threshold lands on it and nothing can cross.
The tail is a fixed function of the references, so the threshold keeps its guarantee. Combinations (higher =
more OOD): ``fisher``, ``-2 * sum_j log p_j`` (evidence adds up over components), and ``min-p``,
``-log min_j p_j`` (the most surprised component decides; robust to one weak component).

The 95%-TPR threshold of ``fused`` is fitted on the calibration half its references were *not* drawn from
(references and the choice below use the other half), so the split-conformal guarantee holds exactly.

**The default** (:data:`NEW_CLASS_RULE`): ``fisher(knn_centred, rel_mahalanobis, maxlogit)``, one score of
each kind of evidence: the distance to the nearest training features (centred kNN), the class-conditional
density (relative Mahalanobis) and the classifier's confidence (max-logit). The OOD the loop exists to find is
a new class of the same domain, and no signal computable at export time ranks the scores for it: the synthetic
validation groups favour logit scores, and holding a known class out of a trained model (with or without
retraining) rates feature distances too well or ranks them weakly. So the rule is fixed by measurement on
real class holdouts (six LeNet-5 runs on MNIST, Fashion-MNIST and digits, three class splits; docs/methods.md,
"New classes"): within 0.5 AUROC points of the best single score on every one, where each single score and
every validated choice trails it by 1 to 12 points on at least one. Its figures on the validation groups are
still recorded, beside every single score's. The validated choice below decides when a version lacks one of
the rule's scores, and with the held-out-class worlds of ``--new-class-holdouts``; ``--fused-components``
fixes any other.

**The choice** (:func:`choose`): every subset of one to :data:`MAX_COMPONENTS` scores, with each combination,
is scored on the reference half's own scores (leave-one-out p-values ``#{R_j >= s} / n``) against each
validation OOD group (near, far, user sets; :mod:`oodguard.export.validation`), in two steps:

1. **No group may be traded away.** Admissible: on *every* group at most :data:`MAX_ERROR_RATIO` times the
   ranking errors of that group's best single score, counted by :func:`tail_error` (wrongly ranked (ID, OOD)
   pairs, the ID scores' upper tail continued by the exponential tail above). Plain AUROC cannot do this: far
   validation AUROCs saturate at 1.0 (the references rarely hold the rare ID outliers of a large test set), so
   it misses a Fisher sum whose component is weak on far OOD (kNN on noise) letting that component's ID
   outliers outrank far OOD. 1.5 lies between what a good combination costs and what a diluting one does
   (measurements: docs/methods.md#pvalue_fusion-admissibility-and-the-tail); for *independent* components
   min-p costs up to 2 times (Bonferroni's factor), so such a pair may be inadmissible.
2. The best admissible *worst-group* AUROC wins (ties: the larger mean, fewer components, ``fisher``); more
   components win only by at least :data:`MIN_GAIN` over the best admissible candidate with fewer (about an
   AUROC's standard error on a thousand validation images: smaller gains are noise, and each extra component
   is one more way for an input to look in-distribution to a Fisher sum).

None admissible: the smallest error ratio is taken (it trades the least away) and the record says so. A single
component is a candidate too (``fused`` is then its p-value). Every candidate's figures go to
``calibration.json`` (the best ones in full). The gateway explains a fused decision by its *driver*: the
component with the smallest p-value.
"""

from __future__ import annotations

import itertools
from typing import Mapping, Sequence

import numpy as np
import torch

from oodguard.calibration import conformal_p_values

from .. import validation
from .base import Score, buffer

NAME = "fused"
COMBINATIONS = ("fisher", "min-p")
MAX_COMPONENTS = 3
MIN_GAIN = 0.005
MAX_ERROR_RATIO = 1.5
RECORDED_CANDIDATES = 12
#: the validation group of the leave-one-class-out worlds (oodguard.export.new_classes.NEW)
NEW_GROUP = "new"
#: the default decision (module docstring, "The default"): components and combination
NEW_CLASS_RULE = (("knn_centred", "rel_mahalanobis", "maxlogit"), "fisher")


def p_values(references: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Conformal p-values of ``scores`` against ``references`` (any order), float64 (no tail): the gateway's
    formula (:func:`oodguard.calibration.conformal_p_values`)."""
    return conformal_p_values(np.sort(np.asarray(references, np.float64)), scores)


def tail_scale(references: np.ndarray) -> float:
    """``tau``: the mean excess of the references over their 90th percentile (at least 1e-12)."""
    ordered = np.sort(np.asarray(references, np.float64))
    top = ordered[int(np.floor(0.9 * (len(ordered) - 1))):]
    return max(float(np.mean(top - top[0])), 1e-12)


def log_p_values(references: np.ndarray, scores: np.ndarray, tau: float | None = None) -> np.ndarray:
    """``log`` of the conformal p-values, continued past the largest reference by the exponential tail (see
    the module docstring); NaN scores give ``-inf``."""
    references = np.asarray(references, np.float64)
    scores = np.asarray(scores, np.float64)
    tau = tail_scale(references) if tau is None else tau
    n, top = len(references), float(references.max())
    with np.errstate(invalid="ignore"):
        excess = np.where(np.isnan(scores), np.inf, np.maximum(scores - top, 0.0))
        tail = np.log(1.0 / (n + 1.0)) - excess / tau
    beyond = (scores > top) | np.isnan(scores)
    return np.where(beyond, tail, np.log(p_values(references, np.where(np.isnan(scores), top, scores))))


def leave_one_out_p_values(references: np.ndarray) -> np.ndarray:
    """Each reference's p-value against the others: ``#{R >= r} / n`` (its own score counted once)."""
    ordered = np.sort(np.asarray(references, np.float64))
    at_least = len(ordered) - np.searchsorted(ordered, np.asarray(references, np.float64), side="left")
    return at_least / float(len(ordered))


def combine(log_p: np.ndarray, combination: str) -> np.ndarray:
    """The fused statistic of ``log_p`` (``[N, J]`` log p-values)."""
    if combination == "fisher":
        return -2.0 * log_p.sum(axis=1)
    if combination == "min-p":
        return -log_p.min(axis=1)
    raise ValueError(f"combination must be one of {COMBINATIONS}, got {combination!r}")


def tail_error(id_scores: np.ndarray, ood_scores: np.ndarray) -> float:
    """Share of (ID, OOD) pairs with the ID score at least the OOD score (1 - AUROC, ties counted as errors),
    with the ID scores' survival continued past their maximum by the exponential tail of :func:`tail_scale`:
    ``(1 / n) exp(-(s - max) / tau)``. Unlike the empirical AUROC it does not saturate when the sample has no
    error, so it compares candidates that all separate a group perfectly. NaN OOD scores count as caught."""
    ids = np.sort(np.asarray(id_scores, np.float64))
    ood = np.asarray(ood_scores, np.float64)
    ood = np.where(np.isnan(ood), np.inf, ood)
    n, top = len(ids), ids[-1]
    inside = (n - np.searchsorted(ids, ood, side="left")) / n
    with np.errstate(invalid="ignore"):
        beyond = np.exp(-(ood - top) / tail_scale(ids)) / n
    return float(np.mean(np.where(ood > top, beyond, inside)))


def _merge(main: dict, extra: dict) -> dict:
    """One :func:`~oodguard.export.validation.objective` result from two over disjoint groups."""
    auroc = {**main["auroc"], **extra["auroc"]}
    values = list(auroc.values())
    return {"auroc": auroc, "worst": min(values), "mean": float(np.mean(values))}


def choose(reference_scores: Mapping[str, np.ndarray], ood_scores: Mapping[str, np.ndarray], groups: np.ndarray,
           max_components: int = MAX_COMPONENTS, worlds: Sequence = (),
           required: Sequence[str] = ()) -> tuple[tuple[str, ...], str, dict]:
    """The admissible components and combination with the best worst-group validation AUROC (see the module
    docstring). ``worlds``: leave-one-class-out worlds (:class:`oodguard.export.new_classes.World`), pooled into
    the validation group ``new`` (each world's scores as p-values against its own references); only scores
    every world has are candidates then. Returns ``(components, combination, record)``."""
    names = [n for n in reference_scores if np.all(np.isfinite(reference_scores[n]))]
    names = [n for n in names if all(n in w.references and np.all(np.isfinite(w.references[n])) for w in worlds)]
    if not names:
        raise ValueError("fused: no component score has finite reference scores")
    groups = np.asarray(groups)
    group_names = sorted(set(groups.tolist())) + ([NEW_GROUP] if worlds else [])
    id_log_p = {n: np.log(leave_one_out_p_values(reference_scores[n])) for n in names}
    ood_log_p = {n: log_p_values(reference_scores[n], ood_scores[n]) for n in names}
    new_id_log_p = {n: [np.log(leave_one_out_p_values(w.references[n])) for w in worlds] for n in names}
    new_log_p = {n: [log_p_values(w.references[n], w.new[n]) for w in worlds] for n in names}

    def evaluate(subset: tuple[str, ...], combination: str) -> tuple[dict, dict]:
        ids = combine(np.stack([id_log_p[n] for n in subset], axis=1), combination)
        ood = combine(np.stack([ood_log_p[n] for n in subset], axis=1), combination)
        result = validation.objective(ids, ood, groups)
        errors = {g: tail_error(ids, ood[groups == g]) for g in group_names if g != NEW_GROUP}
        if worlds:
            pooled = [np.concatenate([combine(np.stack([side[n][w] for n in subset], axis=1), combination)
                                      for w in range(len(worlds))]) for side in (new_id_log_p, new_log_p)]
            result = _merge(result, validation.objective(*pooled, np.full(len(pooled[1]), NEW_GROUP)))
            errors[NEW_GROUP] = tail_error(*pooled)
        return result, errors

    single = {n: evaluate((n,), COMBINATIONS[0]) for n in names}
    required = tuple(n for n in required if n in names) if all(n in names for n in required) else ()
    candidates = []
    for size in range(max(1, len(required)), min(max_components, len(names)) + 1):
        for subset in itertools.combinations(names, size):
            if not set(required) <= set(subset):
                continue
            for combination in (COMBINATIONS if size > 1 else COMBINATIONS[:1]):
                result, errors = evaluate(subset, combination)
                candidates.append({"components": list(subset), "combination": combination, **result,
                                   "tail_error": errors})
    best_errors = {g: min(errors[g] for _, errors in single.values()) for g in group_names}
    for c in candidates:  # 1e-12: a floor, so that two candidates with no error at all compare as equal
        c["error_ratio"] = max((c["tail_error"][g] + 1e-12) / (best_errors[g] + 1e-12) for g in group_names)
    candidates.sort(key=lambda c: (*(-v for v in validation.key(c)), len(c["components"]),
                                   COMBINATIONS.index(c["combination"])))
    admissible = [c for c in candidates if c["error_ratio"] <= MAX_ERROR_RATIO]
    best = None
    for size in range(max(1, len(required)), min(max_components, len(names)) + 1):  # parsimony: a larger set must gain MIN_GAIN
        top = next((c for c in admissible if len(c["components"]) == size), None)
        if top is not None and (best is None or top["worst"] >= best["worst"] + MIN_GAIN):
            best = top
    if best is None:  # nothing admissible: the candidate that trades the least away
        best = min(candidates, key=lambda c: c["error_ratio"])
    sizes = {str(g): int(n) for g, n in zip(*np.unique(np.asarray(groups, dtype=str), return_counts=True))}
    if worlds:
        sizes[NEW_GROUP] = int(sum(len(next(iter(w.new.values()))) for w in worlds))
    record = {
        "procedure": "admissible candidates (every group's tail error at most max_error_ratio times the best single "
                     "score's), then worst-group validation AUROC (see oodguard.export.scores.pvalue_fusion)",
        "candidates_evaluated": len(candidates),
        "min_gain": MIN_GAIN,
        "max_error_ratio": MAX_ERROR_RATIO,
        "admissible": len(admissible),
        "chosen": best,
        "best_candidates": candidates[:RECORDED_CANDIDATES],
        "best_single_tail_error": best_errors,
        "single_scores": {n: result for n, (result, _) in single.items()},
        "required": list(required),
        "validation_groups": sizes,
        "references_n": int(len(next(iter(reference_scores.values())))),
    }
    if worlds:
        record["new_classes"] = {
            "procedure": "leave one class out (see oodguard.export.new_classes): each held-out class's reference "
                         "images against the other classes' in a world without it",
            "held_out": [int(w.held_out) for w in worlds],
            "references_n": int(sum(len(next(iter(w.references.values()))) for w in worlds)),
            "new_n": sizes[NEW_GROUP],
        }
    if not admissible:
        record["note"] = (f"no candidate is admissible (every group's tail error within {MAX_ERROR_RATIO}x the best "
                          "single score's): chosen by the smallest error ratio")
    return tuple(best["components"]), best["combination"], record


def rule_record(reference_scores: Mapping[str, np.ndarray], ood_scores: Mapping[str, np.ndarray],
                groups: np.ndarray) -> dict:
    """What calibration.json records of the default decision: the rule, and its figures on the validation groups
    beside the best single score's (:func:`choose` restricted to the rule's components)."""
    components, combination = NEW_CLASS_RULE
    _, _, record = choose(reference_scores, ood_scores, groups, max_components=len(components), required=components)
    chosen = next(c for c in record["best_candidates"] if c["combination"] == combination)
    return {**record, "procedure": f"the new-class rule: {combination}({', '.join(components)}), fixed by "
                                   "measurement on unseen classes (see oodguard.export.scores.pvalue_fusion)",
            "chosen": chosen}


class PValueFusion(Score):
    """The fused score: fitted by :meth:`from_references` after the component scores (not in the registry,
    which fits on training features; its references are held-out calibration scores)."""

    name = NAME

    def __init__(self, components: tuple[str, ...], combination: str, references: Mapping[str, np.ndarray],
                 selection: dict):
        super().__init__()
        if combination not in COMBINATIONS:
            raise ValueError(f"combination must be one of {COMBINATIONS}, got {combination!r}")
        if not components:
            raise ValueError("fused: name at least one component score")
        self.components = tuple(components)
        self.combination = combination
        self.selection = selection
        for j, name in enumerate(self.components):  # sorted, float32 like the score outputs they meet
            self.register_buffer(f"references_{j}", buffer(np.sort(np.asarray(references[name], np.float64))))
        self.n = int(len(references[self.components[0]]))
        self.tails = [tail_scale(getattr(self, f"references_{j}").numpy()) for j in range(len(self.components))]

    @classmethod
    def from_references(cls, reference_scores: Mapping[str, np.ndarray], ood_scores: Mapping[str, np.ndarray],
                        groups: np.ndarray, components: tuple[str, ...] | None = None,
                        combination: str | None = None, worlds: Sequence = ()) -> "PValueFusion":
        """Choose (unless ``components``/``combination`` are given) and build the fused score; ``worlds``: the
        leave-one-class-out worlds of the ``new`` validation group (see :func:`choose`)."""
        rule_components, rule_combination = NEW_CLASS_RULE
        if components is None and not worlds and all(n in reference_scores for n in rule_components):
            selection = rule_record(reference_scores, ood_scores, groups)
            components, combination = tuple(selection["chosen"]["components"]), combination or rule_combination
        elif components is None:
            components, chosen_combination, selection = choose(reference_scores, ood_scores, groups, worlds=worlds)
            combination = combination or chosen_combination
        else:
            missing = [c for c in components if c not in reference_scores]
            if missing:
                raise ValueError(f"fused: unknown component score(s) {missing}; scores: {list(reference_scores)}")
            selection = {"procedure": "fixed"}
        return cls(tuple(components), combination or COMBINATIONS[0], reference_scores, selection)

    def forward(self, logits, features, computed):
        log_p = []
        for j, name in enumerate(self.components):
            references = getattr(self, f"references_{j}")
            score = computed[name].float()
            at_least = (references.unsqueeze(0) >= score.unsqueeze(1)).sum(dim=1)
            inside = torch.log((at_least.double() + 1.0) / (self.n + 1.0))
            excess = (score.double() - references[-1].double()).clamp(min=0.0)  # NaN: the tail's -inf below
            excess = torch.where(torch.isnan(score), torch.full_like(excess, float("inf")), excess)
            tail = torch.log(torch.tensor(1.0 / (self.n + 1.0), dtype=torch.float64)) - excess / self.tails[j]
            log_p.append(torch.where((score > references[-1]) | torch.isnan(score), tail, inside))
        stacked = torch.stack(log_p, dim=1)
        fused = -2.0 * stacked.sum(dim=1) if self.combination == "fisher" else -stacked.amin(dim=1)
        return fused.abs().float()  # >= 0 by construction; abs turns -0.0 (every p-value 1) into 0

    def metadata(self):
        return {"components": list(self.components), "combination": self.combination, "references_n": self.n,
                "tail_scales": dict(zip(self.components, self.tails)), "selection": self.selection}
