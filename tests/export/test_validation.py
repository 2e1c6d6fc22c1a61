import numpy as np
import pytest

from oodguard.export.synthetic import validation_ood
from oodguard.export.validation import ValidationOOD, key, objective


def test_objective_is_the_worst_groups_auroc_with_the_mean_beside_it():
    ids = np.zeros(10)
    result = objective(ids, np.r_[np.ones(5), -np.ones(5)], np.array(["a"] * 5 + ["b"] * 5))
    assert result["auroc"] == {"a": 1.0, "b": 0.0} and result["worst"] == 0.0 and result["mean"] == 0.5
    assert key(objective(ids, np.ones(4), np.array(["a"] * 4))) > key(result)


def test_non_finite_ood_scores_count_as_most_ood():
    result = objective(np.zeros(4), np.array([np.nan, np.inf]), np.array(["a", "a"]))
    assert result["worst"] == 1.0


def test_synthetic_validation_ood_is_grouped_near_and_far():
    images = np.random.default_rng(0).random((30, 1, 8, 8)).astype(np.float32)
    out = validation_ood(images, np.repeat([0, 1, 2], 10), size=12, seed=0)
    assert out.group_sizes == {"far": 4, "near": 8} and len(out) == 12
    both = ValidationOOD.concatenate([out, ValidationOOD(images[:3], np.array(["user:x"] * 3, dtype=object))])
    assert both.group_sizes == {"far": 4, "near": 8, "user:x": 3} and both.images.shape == (15, 1, 8, 8)
    with pytest.raises(ValueError, match="group labels"):
        ValidationOOD(images[:3], np.array(["a"]))
