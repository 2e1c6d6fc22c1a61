import dataclasses

import numpy as np
import pytest

from oodguard.harvest import Context, Pool
from oodguard.harvest.strategies._open_head import detector, fit_head, head_logits

from .conftest import high_logit_unknowns, ids


def test_head_learns_the_labeled_unknowns_the_k_way_logits_call_known():
    pool, known, context = high_logit_unknowns(np.random.default_rng(0))
    view = detector(pool, context, seed=0, balanced=False)
    assert view.trained and view.context.unknown_label == 3 and view.context.known_classes == 3
    assert view.pool.logits.shape == (len(pool), 4) and view.pool.ids.tolist() == pool.ids.tolist()
    predicted = view.pool.logits.argmax(axis=1)
    assert (predicted[~known] == 3).mean() > 0.95  # the unknown cluster → the unknown output
    assert (predicted[known] == pool.logits[known].argmax(axis=1)).mean() > 0.95  # knowns keep their class
    assert (pool.logits[~known].argmax(axis=1) != 3).all()  # the K-way model has no way to say "unknown"
    assert "15 labeled known + 6 labeled unknown" in view.note


def test_without_labeled_unknowns_the_pool_logits_are_used_and_the_note_says_so():
    pool, known, context = high_logit_unknowns(np.random.default_rng(1))
    for ctx, why in ((dataclasses.replace(context, unknown_features=None), "no labeled unknowns"),
                     (dataclasses.replace(context, unknown_features=np.zeros((0, 6))), "no labeled unknowns"),
                     (dataclasses.replace(context, params={"head": "mav"}), "head=mav")):
        view = detector(pool, ctx, seed=0, balanced=False)
        assert not view.trained and view.pool is pool and view.context is ctx
        assert "MAV-only" in view.note and why in view.note
    with pytest.raises(ValueError, match="head must be"):
        detector(pool, dataclasses.replace(context, params={"head": "k+1"}), seed=0, balanced=False)


def test_a_known_class_without_labels_is_never_predicted_and_two_classes_work():
    rng = np.random.default_rng(2)
    x = np.concatenate([rng.normal(0, 0.1, (20, 2)), rng.normal(3, 0.1, (20, 2))])
    y = np.repeat([0, 3], 20)  # known class 0 and the unknown class (K = 3): classes 1 and 2 have no rows
    logits = head_logits(fit_head(x, y, 0, 1.0, balanced=False), x, 3)
    assert logits.shape == (40, 4)
    assert (logits.argmax(axis=1) == y).all()
    assert (logits[:, 1:3] < logits[:, [0, 3]].min(axis=1, keepdims=True)).all()


def test_class_weights_raise_the_rare_unknown_class():
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.normal(0, 1, (200, 2)), rng.normal(1.5, 1, (4, 2))])
    y = np.concatenate([np.zeros(200, np.int64), np.ones(4, np.int64)])  # K = 1 known class, 4 unknowns
    probe = np.array([[1.5, 1.5]])
    plain = head_logits(fit_head(x, y, 0, 1.0, balanced=False), probe, 1)
    weighted = head_logits(fit_head(x, y, 0, 1.0, balanced=True), probe, 1)
    assert plain.argmax() == 0 and weighted.argmax() == 1  # w_c = N / n_c turns the rare class on


def test_labels_outside_the_known_classes_are_refused():
    pool = Pool(ids(4), np.zeros((4, 2)), np.zeros((4, 2)))
    context = Context(labeled_features=np.zeros((2, 2)), labeled_labels=np.array([0, 2]), unknown_features=np.ones((1, 2)))
    with pytest.raises(ValueError, match="known-class indices in 0..1"):
        detector(pool, context, seed=0, balanced=False)
