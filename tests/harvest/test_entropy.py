import numpy as np
import pytest

from oodguard.harvest import Pool, get_strategy

from .conftest import ids

# entropies (nats): 0.00091, 1.0986 (uniform), 0.7054, 0.6669, 1.0685
LOGITS = np.array([[10, 0, 0], [0, 0, 0], [1, 1, -5], [2, 0, 0], [0.5, 0, 0]], np.float32)


@pytest.mark.parametrize("budget, expected", [(1, [1]), (2, [1, 4]), (3, [1, 4, 2]), (4, [1, 4, 2, 3])])
def test_picks_the_highest_entropy_rows(budget, expected):
    pool = Pool(ids(5), np.zeros((5, 2)), LOGITS)
    selection = get_strategy("entropy").select(pool, budget)
    assert selection.indices.tolist() == expected
    assert "1.099 nats" in selection.reasons[0]


def test_ties_break_by_index():
    pool = Pool(ids(4), np.zeros((4, 2)), np.zeros((4, 3)))
    assert get_strategy("entropy").select(pool, 2).indices.tolist() == [0, 1]
