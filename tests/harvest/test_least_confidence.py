import numpy as np
import pytest

from oodguard.harvest import Pool, get_strategy

from .conftest import ids

# top probabilities: ~1.0, 0.333, 0.4988, 0.787, 0.4519
LOGITS = np.array([[10, 0, 0], [0, 0, 0], [1, 1, -5], [2, 0, 0], [0.5, 0, 0]], np.float32)


@pytest.mark.parametrize("budget, expected", [(1, [1]), (2, [1, 4]), (3, [1, 4, 2]), (4, [1, 4, 2, 3])])
def test_picks_the_least_confident_rows(budget, expected):
    pool = Pool(ids(5), np.zeros((5, 2)), LOGITS)
    selection = get_strategy("least-confidence").select(pool, budget)
    assert selection.indices.tolist() == expected
    assert "0.333" in selection.reasons[0]
