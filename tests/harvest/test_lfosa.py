import dataclasses

import numpy as np

from oodguard.harvest import Context, Pool, get_strategy
from oodguard.harvest.strategies._mixture import fit_p_known

from .conftest import high_logit_unknowns, ids


def open_set_pool(rng, pure_class=False):
    """3 known classes + an "unknown" output (index 3). Per class: 60 known items (MAV ≈ 8) and 60 unknown
    items the model still assigns to it (MAV ≈ 3); plus 30 unknowns predicted "unknown". With
    ``pure_class`` class 2 has no unknowns (unimodal MAVs)."""
    rows, known = [], []
    for c in range(3):
        for is_known, centre, count in ((True, 8.0, 60), (False, 3.0, 0 if pure_class and c == 2 else 60)):
            for mav in rng.normal(centre, 0.5, count):
                z = rng.normal(0, 0.3, 4) - 2.0
                z[c] = mav
                z[(c + 1) % 3] = mav - rng.uniform(0.5, 3.0)  # a runner-up class, so entropies differ
                rows.append(z)
                known.append(is_known)
    for _ in range(30):
        z = rng.normal(0, 0.3, 4)
        z[3] = 5.0
        rows.append(z)
        known.append(False)
    logits = np.array(rows, np.float32)
    return Pool(ids(len(rows)), rng.normal(size=(len(rows), 4)), logits), np.array(known)


def test_precision_beats_random():
    rng = np.random.default_rng(0)
    pool, known = open_set_pool(rng)
    context = Context(known_classes=3, unknown_label=3)
    lfosa = get_strategy("lfosa").select(pool, 60, seed=0, context=context)
    random = get_strategy("random").select(pool, 60, seed=0, context=context)
    assert known[lfosa.indices].mean() == 1.0
    assert known[random.indices].mean() < 0.6


def test_predicted_unknown_gets_zero_and_bimodal_classes_are_split():
    rng = np.random.default_rng(1)
    pool, known = open_set_pool(rng)
    result = fit_p_known(pool, 0, Context(unknown_label=3), bayesian=False)
    assert (result.p_known[-30:] == 0).all() and (result.predicted[-30:] == -1).all()
    assert not result.guarded
    assert result.p_known[known].min() > 0.9 and result.p_known[~known][:-30].max() < 0.1


def test_guard_keeps_a_unimodal_class():
    rng = np.random.default_rng(2)
    pool, known = open_set_pool(rng, pure_class=True)
    context = Context(unknown_label=3)
    result = fit_p_known(pool, 0, context, bayesian=False)
    pure = result.predicted == 2
    assert result.guarded == {2} and (result.p_known[pure] == 1.0).all()
    assert "unimodal guard" in result.notes[2]
    selection = get_strategy("lfosa").select(pool, 60, seed=0, context=context)  # ties at 1: by MAV
    reasons = [r for i, r in zip(selection.indices, selection.reasons) if pure[i]]
    assert reasons and all("unimodal guard" in r for r in reasons)
    # without the guard the mixture would call part of the pure class unknown
    unguarded = fit_p_known(pool, 0, Context(unknown_label=3, params={"ashman_d": 0, "min_weight": 0}), False)
    assert (unguarded.p_known[pure] < 0.5).sum() > 5


def test_k_way_model_is_the_mav_only_variant():
    rng = np.random.default_rng(3)
    pool, known = open_set_pool(rng)
    k_way = Pool(pool.ids[:-30], pool.features[:-30], pool.logits[:-30, :3])
    selection = get_strategy("lfosa").select(k_way, 60, context=Context(known_classes=3))
    assert known[:-30][selection.indices].mean() == 1.0


def test_k_plus_one_head_learns_from_labeled_unknowns_where_mav_only_fails():
    # unknowns with higher top logits than the knowns: MAV-only takes them, the (K+1)-way head does not
    pool, known, context = high_logit_unknowns(np.random.default_rng(4))
    mav_only = get_strategy("lfosa").select(pool, 60, seed=0, context=dataclasses.replace(context, params={"head": "mav"}))
    with_head = get_strategy("lfosa").select(pool, 60, seed=0, context=context)
    assert known[mav_only.indices].mean() < 0.1
    assert known[with_head.indices].mean() == 1.0
    assert "(K+1)-way head on 15 labeled known + 6 labeled unknown" in with_head.reasons[0]
    assert "MAV-only" in mav_only.reasons[0]
    # without labeled unknowns in the context there is nothing to learn from: MAV-only again
    no_unknowns = get_strategy("lfosa").select(pool, 60, seed=0, context=dataclasses.replace(context, unknown_features=None))
    assert no_unknowns.indices.tolist() == mav_only.indices.tolist()
