import numpy as np
import pytest

from oodguard.harvest import Pool, get_strategy

from .conftest import ids

# top-2 margins: ~1.0, 0 (uniform), 0 (two tied classes), 0.681, 0.178
LOGITS = np.array([[10, 0, 0], [0, 0, 0], [1, 1, -5], [2, 0, 0], [0.5, 0, 0]], np.float32)


@pytest.mark.parametrize("budget, expected", [(1, [1]), (2, [1, 2]), (3, [1, 2, 4]), (4, [1, 2, 4, 3])])
def test_picks_the_smallest_margins(budget, expected):
    pool = Pool(ids(5), np.zeros((5, 2)), LOGITS)
    selection = get_strategy("margin").select(pool, budget)
    assert selection.indices.tolist() == expected
    assert "margin 0.000" in selection.reasons[0]


def test_single_output_model_has_margin_one():
    pool = Pool(ids(3), np.zeros((3, 2)), np.ones((3, 1)))
    assert get_strategy("margin").select(pool, 2).indices.tolist() == [0, 1]
