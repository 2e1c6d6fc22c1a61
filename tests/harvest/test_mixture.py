import numpy as np
import pytest

from oodguard.harvest import Context, Pool
from oodguard.harvest.strategies._mixture import ashman_d, fit_p_known

from .conftest import ids


def test_ashman_d():
    assert ashman_d(np.array([0.0, 2.0]), np.array([1.0, 1.0])) == pytest.approx(2.0)
    assert ashman_d(np.array([0.0, 1.0]), np.array([1.0, 1.0])) == pytest.approx(1.0)


def test_single_members_and_constant_classes_are_known():
    logits = np.array([[5, 0], [0, 3], [0, 3], [0, 3]], np.float32)
    result = fit_p_known(Pool(ids(4), np.zeros((4, 1)), logits), 0, Context(), bayesian=False)
    assert result.p_known.tolist() == [1.0, 1.0, 1.0, 1.0]
    assert "single member" in result.notes[0] and "all MAVs equal" in result.notes[1]


def test_large_classes_are_fitted_on_a_subsample():
    rng = np.random.default_rng(0)
    mav = np.concatenate([rng.normal(8, 0.5, 300), rng.normal(2, 0.5, 300)])
    logits = np.stack([mav, np.zeros(600)], axis=1)
    pool = Pool(ids(600), np.zeros((600, 1)), logits)
    result = fit_p_known(pool, 0, Context(params={"max_fit": 100}), bayesian=False)
    assert result.p_known[:300].min() > 0.9 and result.p_known[300:].max() < 0.1
