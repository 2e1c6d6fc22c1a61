import numpy as np

from oodguard.harvest import Context, Pool, get_strategy

from .conftest import blobs, ids


def _pool():
    # 4 clusters of 50; every score in cluster 0 is above every score elsewhere
    rng = np.random.default_rng(0)
    features, group = blobs(rng, 3 * np.eye(4, 8), [50] * 4, spread=0.3)
    sisome = rng.uniform(0, 1, 200) + 2.0 * (group == 0)
    return Pool(ids(200), features, np.zeros((200, 3)), {"sisome": sisome}), group, sisome


def test_covers_more_clusters_than_plain_top_b():
    pool, group, sisome = _pool()
    plain = get_strategy("sisom").select(pool, 8)
    diverse = get_strategy("sisom-diverse").select(pool, 8, seed=0)
    assert len(set(group[plain.indices])) == 1
    assert len(set(group[diverse.indices])) >= 3
    assert diverse.indices[0] == np.argmax(sisome)  # starts from the top score
    # within each cluster it still takes the highest scores first
    for c in set(group[diverse.indices]):
        picked = diverse.indices[group[diverse.indices] == c]
        assert sisome[picked].max() == sisome[group == c].max()


def test_radius_zero_is_plain_top_b():
    pool, group, sisome = _pool()
    plain = get_strategy("sisom").select(pool, 8).indices.tolist()
    zero = get_strategy("sisom-diverse").select(pool, 8, context=Context(params={"radius": 0.0}))
    assert zero.indices.tolist() == plain


def test_a_close_item_is_discounted_by_its_distance():
    # three items: a (top), b right next to a (second), c far away (third): c comes before b
    features = np.array([[1, 0], [1, 0.01], [0, 1]], np.float32)
    pool = Pool(ids(3), features, np.zeros((3, 2)), {"sisom": np.array([3.0, 2.0, 1.0])})
    selection = get_strategy("sisom-diverse").select(pool, 2, context=Context(params={"radius": 1.0}))
    assert selection.indices.tolist() == [0, 2]
    assert "first pick" in selection.reasons[0] and "diversity factor 1.000" in selection.reasons[1]
