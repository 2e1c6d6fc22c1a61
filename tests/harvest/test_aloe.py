import numpy as np

from oodguard.harvest import Context, Pool, get_strategy

from .conftest import blobs, ids


def _pool(rng):
    # 3 known classes (50 items each, low OOD score) + 3 novel clusters (20 each, high OOD score)
    features, group = blobs(rng, 4 * np.eye(6, 12), [50, 50, 50, 20, 20, 20], spread=0.2)
    gradnorm = rng.normal(0, 1, len(group)) + 5.0 * (group >= 3)
    logits = rng.normal(size=(len(group), 3))
    return Pool(ids(len(group)), features, logits, {"gradnorm": gradnorm}), group, gradnorm


def test_one_item_per_novel_cluster_the_highest_scoring_one():
    rng = np.random.default_rng(0)
    pool, group, gradnorm = _pool(rng)
    context = Context(known_classes=3, id_scores={"gradnorm": rng.normal(0, 1, 500)})
    for seed in range(3):
        selection = get_strategy("aloe").select(pool, 3, seed=seed, context=context)  # M = 2·max(3, 3) = 6
        assert sorted(group[selection.indices].tolist()) == [3, 4, 5]
        for i in selection.indices:
            assert gradnorm[i] == gradnorm[group == group[i]].max()
    assert "OOD ratio 1.00" in selection.reasons[0] and "95% TPR on held-out ID" in selection.reasons[0]


def test_threshold_falls_back_to_a_pool_quantile_and_says_so():
    rng = np.random.default_rng(1)
    pool, group, _ = _pool(rng)
    selection = get_strategy("aloe").select(pool, 3, context=Context(known_classes=3))
    assert sorted(group[selection.indices].tolist()) == [3, 4, 5]
    assert all("pool quantile 0.50" in reason for reason in selection.reasons)


def test_fewer_clusters_than_budget_fills_by_score():
    score = np.arange(12, dtype=float)
    pool = Pool(ids(12), np.ones((12, 4)), np.zeros((12, 1)), {"gradnorm": score})  # one distinct point
    selection = get_strategy("aloe").select(pool, 4)
    assert selection.indices.tolist() == [11, 10, 9, 8]
    assert "fill by score" in selection.reasons[1]


def test_large_pool_takes_the_minibatch_path():
    rng = np.random.default_rng(2)
    pool, group, _ = _pool(rng)
    context = Context(known_classes=3, id_scores={"gradnorm": rng.normal(0, 1, 500)}, params={"kmeans_max_work": 0})
    selection = get_strategy("aloe").select(pool, 3, seed=0, context=context)
    assert sorted(group[selection.indices].tolist()) == [3, 4, 5]


def test_energy_is_a_parameter_and_flags_by_its_own_threshold():
    # gradnorm points at the novel clusters 3-5, energy at clusters 0-2: score=energy follows energy
    rng = np.random.default_rng(3)
    pool, group, gradnorm = _pool(rng)
    energy = rng.normal(0, 1, len(group)) + 5.0 * (group < 3)
    pool = Pool(pool.ids, pool.features, pool.logits, {"gradnorm": gradnorm, "energy": energy})
    id_scores = {"gradnorm": rng.normal(0, 1, 500), "energy": rng.normal(0, 1, 500)}
    by_energy = get_strategy("aloe").select(pool, 3, context=Context(known_classes=3, id_scores=id_scores,
                                                                     params={"score": "energy"}))
    by_gradnorm = get_strategy("aloe").select(pool, 3, context=Context(known_classes=3, id_scores=id_scores))
    assert set(group[by_energy.indices]) <= {0, 1, 2} and sorted(group[by_gradnorm.indices]) == [3, 4, 5]
    assert "mean energy" in by_energy.reasons[0]
