import numpy as np
import pytest

from oodguard.harvest.strategies._quotas import water_fill


def test_equal_counts_split_the_batch_evenly():
    assert water_fill([10, 10, 10], [100, 100, 100], 9).tolist() == [3, 3, 3]
    assert water_fill([10, 10, 10], [100, 100, 100], 10).tolist() == [4, 3, 3]  # ties: lowest class


def test_a_starved_class_catches_up_first():
    # class 1 has 10 labels, the others 40: the first 30 slots go to class 1, the rest evenly
    assert water_fill([40, 10, 40], [100, 100, 100], 37).tolist() == [3, 32, 2]


def test_a_class_short_of_candidates_gives_its_share_to_the_others():
    quotas = water_fill([10, 10, 10], [2, 100, 100], 12)
    assert quotas.tolist() == [2, 5, 5]
    assert water_fill([0, 0], [3, 4], 100).tolist() == [3, 4]  # fewer candidates than budget: take all


def test_shapes_must_agree():
    with pytest.raises(ValueError, match="same shape"):
        water_fill(np.zeros(3), np.zeros(2), 5)
