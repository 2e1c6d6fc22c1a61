import dataclasses

import numpy as np

from oodguard.harvest import Context, get_strategy
from oodguard.harvest.strategies._mixture import fit_p_known, rank_by_p_known
from oodguard.harvest.strategies.base import entropy, softmax

from .conftest import high_logit_unknowns
from .test_lfosa import open_set_pool


def test_precision_beats_random_and_picks_entropy_among_the_top_a():
    rng = np.random.default_rng(0)
    pool, known = open_set_pool(rng)
    context = Context(known_classes=3, unknown_label=3)
    selection = get_strategy("jsosal").select(pool, 15, seed=0, context=context)  # a = 4·15 = 60
    random = get_strategy("random").select(pool, 15, seed=0, context=context)
    assert known[selection.indices].mean() == 1.0 and known[random.indices].mean() < 0.7
    result = fit_p_known(pool, 0, context, bayesian=True)
    candidates = rank_by_p_known(result)[:60]
    h = entropy(softmax(pool.logits[candidates][:, :3]))
    assert selection.indices.tolist() == candidates[np.argsort(-h, kind="stable")[:15]].tolist()
    assert "top a=60" in selection.reasons[0]


def test_k_sets_the_candidate_count():
    rng = np.random.default_rng(1)
    pool, known = open_set_pool(rng)
    selection = get_strategy("jsosal").select(pool, 10, context=Context(unknown_label=3, params={"k": 2}))
    assert "top a=20" in selection.reasons[0]


def test_guard_keeps_a_unimodal_class():
    rng = np.random.default_rng(2)
    pool, known = open_set_pool(rng, pure_class=True)
    result = fit_p_known(pool, 0, Context(unknown_label=3), bayesian=True)
    pure = result.predicted == 2
    assert 2 in result.guarded and (result.p_known[pure] == 1.0).all()
    assert "unimodal guard" in result.notes[2] and "BayesianGaussianMixture" in result.notes[0]
    assert 0 not in result.guarded and 1 not in result.guarded


def test_class_weighted_k_plus_one_head_learns_from_labeled_unknowns_where_mav_only_fails():
    pool, known, context = high_logit_unknowns(np.random.default_rng(5))
    mav_only = get_strategy("jsosal").select(pool, 30, seed=0, context=dataclasses.replace(context, params={"head": "mav"}))
    with_head = get_strategy("jsosal").select(pool, 30, seed=0, context=context)  # a = 120 of 360
    assert known[mav_only.indices].mean() < 0.2
    assert known[with_head.indices].mean() == 1.0
    assert "class-weighted" in with_head.reasons[0]
