import dataclasses

import numpy as np
import pytest

from oodguard.harvest import Context, Pool, get_strategy
from oodguard.harvest.strategies.open_quota import conformal_p, rank01

from .conftest import high_logit_unknowns, ids


def two_kinds_of_unknowns(seed=0):
    """high_logit_unknowns (3 known classes; unknowns with higher top logits, in the cluster the labeled unknowns
    come from, whose scores look known) plus 90 unknowns of a kind never labeled, far in feature space, whose
    scores are high. Returns (pool, kind [N]: 0 known, 1 labeled-like unknown, 2 new unknown, context)."""
    rng = np.random.default_rng(seed)
    pool, known, context = high_logit_unknowns(rng)
    n_new = 90
    features = np.concatenate([pool.features, 3.0 * np.eye(6)[4] + 0.3 * rng.normal(size=(n_new, 6))])
    logits = np.concatenate([pool.logits, rng.normal(0, 1, (n_new, 3)) + 6.0 * np.eye(3)[rng.integers(0, 3, n_new)]])
    kind = np.concatenate([np.where(known, 0, 1), np.full(n_new, 2)])
    sisome = rng.uniform(0, 1, len(kind)) + 3.0 * (kind == 2)
    knn = sisome + rng.normal(0, 0.1, len(kind))
    big = Pool(ids(len(kind)), features, logits, {"sisome": sisome, "knn": knn})
    return big, kind, dataclasses.replace(context, id_scores={"sisome": rng.uniform(0, 1.05, 500)})


def test_both_filters_together_keep_every_kind_of_unknown_out():
    pool, kind, context = two_kinds_of_unknowns()
    selection = get_strategy("open-quota").select(pool, 60, seed=0, context=context)
    assert (kind[selection.indices] == 0).all()
    # without the head the labeled-like unknowns (their scores look known) get in; without the gate, the new ones
    no_head = get_strategy("open-quota").select(pool, 60, seed=0, context=dataclasses.replace(context, params={"head": "mav"}))
    # (ranked by score: the new unknowns' confident logits keep them out of a margin ranking, gate or not)
    no_gate = get_strategy("open-quota").select(pool, 60, seed=0, context=dataclasses.replace(
        context, id_scores=None, params={"rank": "score"}))
    assert (kind[no_head.indices] == 1).mean() > 0.3
    assert (kind[no_gate.indices] == 2).mean() > 0.3
    assert "no score gate" in no_gate.reasons[0] and "MAV-only" in no_head.reasons[0]


def test_quotas_give_the_batch_to_the_class_with_fewest_labels():
    pool, kind, context = two_kinds_of_unknowns(1)
    labels = np.array([0] * 2 + [1] * 20 + [2] * 20)
    features = 3.0 * np.eye(6)[labels] + 0.3 * np.random.default_rng(1).normal(size=(len(labels), 6))
    starved = dataclasses.replace(context, labeled_features=features, labeled_labels=labels)
    selection = get_strategy("open-quota").select(pool, 30, seed=0, context=starved)
    predicted = pool.logits.argmax(axis=1)[selection.indices]
    assert np.bincount(predicted, minlength=3).tolist() == [22, 4, 4]  # 18 slots bring class 0 to 20, then 4 each
    assert "quota 22, 2 labeled" in selection.reasons[predicted.tolist().index(0)]


def test_the_slice_is_the_most_known_like_and_the_pick_its_most_surprising_item():
    pool, kind, context = two_kinds_of_unknowns(2)
    plain = dataclasses.replace(context, unknown_features=None, params={"k": 2, "radius": 0, "rank": "score"})
    selection = get_strategy("open-quota").select(pool, 6, seed=0, context=plain)  # quotas 2 per class, slice of 4
    score, likeness = pool.scores["sisome"], rank01(pool.scores["sisome"]) + rank01(pool.scores["knn"])
    passed = conformal_p(score, context.id_scores["sisome"]) > 0.05
    predicted = pool.logits.argmax(axis=1)
    for c in range(3):
        members = np.flatnonzero(passed & (predicted == c))
        slice_ = members[np.argsort(likeness[members], kind="stable")[:4]]
        expected = slice_[np.argsort(-score[slice_], kind="stable")[:2]]
        assert sorted(selection.indices[predicted[selection.indices] == c].tolist()) == sorted(expected.tolist())
    assert all("k_eff 2.0" in r and "among the class's 4 candidates" in r for r in selection.reasons)


def test_by_default_the_slice_is_ranked_by_the_known_class_margin():
    """Same slices as above; within each, the items with the smallest top-2 known-class probability margin."""
    pool, kind, context = two_kinds_of_unknowns(2)
    plain = dataclasses.replace(context, unknown_features=None, params={"k": 2, "radius": 0})
    selection = get_strategy("open-quota").select(pool, 6, seed=0, context=plain)
    score, likeness = pool.scores["sisome"], rank01(pool.scores["sisome"]) + rank01(pool.scores["knn"])
    passed = conformal_p(score, context.id_scores["sisome"]) > 0.05
    predicted = pool.logits.argmax(axis=1)
    z = pool.logits - pool.logits.max(axis=1, keepdims=True)
    p = np.sort(np.exp(z) / np.exp(z).sum(axis=1, keepdims=True), axis=1)
    margin = p[:, -1] - p[:, -2]
    for c in range(3):
        members = np.flatnonzero(passed & (predicted == c))
        slice_ = members[np.argsort(likeness[members], kind="stable")[:4]]
        expected = slice_[np.argsort(margin[slice_], kind="stable")[:2]]
        assert sorted(selection.indices[predicted[selection.indices] == c].tolist()) == sorted(expected.tolist())
    assert all("margin percentile" in r for r in selection.reasons)
    by_score = get_strategy("open-quota").select(pool, 6, seed=0, context=dataclasses.replace(plain, params={**plain.params, "rank": "score"}))
    assert set(by_score.indices.tolist()) != set(selection.indices.tolist())  # the two rankings differ on this pool
    with pytest.raises(ValueError, match="rank must be score or margin"):
        get_strategy("open-quota").select(pool, 6, seed=0, context=dataclasses.replace(plain, params={"rank": "entropy"}))


def test_the_slice_widens_with_the_labeled_unknowns():
    pool, kind, context = two_kinds_of_unknowns(3)  # 6 labeled unknowns
    selection = get_strategy("open-quota").select(pool, 6, seed=0, context=dataclasses.replace(context, params={"k": 2, "widen": 3}))
    assert all("k_eff 6.0" in r and "among the class's 12 candidates" in r for r in selection.reasons)


def test_the_second_score_changes_the_slice():
    # one class; sisome ranks 0..5, knn disagrees on item 0: sisome + knn puts items 1 and 2 in a slice of 2
    pool = Pool(ids(6), np.eye(6), np.zeros((6, 1)), {"sisome": np.arange(6.0), "knn": np.array([5.0, 0, 1, 2, 3, 4])})
    pick = {second: get_strategy("open-quota").select(pool, 1, context=Context(params={"k": 2, "slice_score": second,
                                                                                       "rank": "score"})).indices[0]
            for second in ("knn", "none")}
    assert pick == {"knn": 2, "none": 1}


def test_fewer_passing_than_budget_are_filled_with_the_most_likely_known():
    pool, kind, context = two_kinds_of_unknowns(4)
    strict = dataclasses.replace(context, params={"alpha": 0.9})  # few items pass a p-value above 0.9
    selection = get_strategy("open-quota").select(pool, 200, seed=0, context=strict)
    fillers = [r for r in selection.reasons if "filler" in r]
    assert fillers and len(fillers) < 200 and all("filler" in r for r in selection.reasons[-len(fillers):])


def test_conformal_p_value_and_ranks():
    id_scores = np.array([1.0, 2.0, 3.0])
    assert conformal_p(np.array([0.5, 2.0, 3.5, np.nan]), id_scores).tolist() == [1.0, 0.75, 0.25, 0.0]
    assert rank01(np.array([3.0, np.nan, 1.0, 2.0])).tolist() == [0.5, 0.75, 0.0, 0.25]
