import numpy as np
import pytest
import torch

from oodguard.calibration import ScoreThreshold
from oodguard.export.scores.pvalue_fusion import (MAX_ERROR_RATIO, NEW_CLASS_RULE, PValueFusion, choose, combine,
                                                   leave_one_out_p_values, log_p_values, p_values, tail_error,
                                                   tail_scale)


def test_p_values_follow_the_conformal_formula_and_match_the_gateways():
    references = np.array([3.0, 1.0, 2.0, 2.0, 5.0])
    scores = np.array([0.0, 2.0, 2.5, 5.0, 9.0, np.nan])
    expected = [(1 + 5) / 6, (1 + 4) / 6, (1 + 2) / 6, (1 + 1) / 6, 1 / 6, 1 / 6]
    np.testing.assert_allclose(p_values(references, scores), expected)
    ordered = np.sort(references)
    gateway = ScoreThreshold("x", 3.0, 0.95, 5, 4, 0.8, (0.3, 0.99), ordered).p_values(scores[:-1])
    np.testing.assert_allclose(p_values(references, scores[:-1]), gateway)
    np.testing.assert_allclose(leave_one_out_p_values(references), [2 / 5, 5 / 5, 4 / 5, 4 / 5, 1 / 5])


def test_combinations():
    log_p = np.log(np.array([[0.5, 0.1], [0.01, 0.9]]))
    np.testing.assert_allclose(combine(log_p, "fisher"), -2 * log_p.sum(axis=1))
    np.testing.assert_allclose(combine(log_p, "min-p"), [-np.log(0.1), -np.log(0.01)])
    with pytest.raises(ValueError, match="combination"):
        combine(log_p, "stouffer")


def _complementary(seed=0, n=400):
    """Score 'near_expert' separates the near group only, 'far_expert' the far group only, 'noise' neither."""
    rng = np.random.default_rng(seed)
    groups = np.array(["near"] * n + ["far"] * n, dtype=object)
    ref = {name: rng.normal(size=n) for name in ("near_expert", "far_expert", "noise")}
    ood = {"near_expert": np.r_[rng.normal(3, 1, n), rng.normal(0, 1, n)],
           "far_expert": np.r_[rng.normal(0, 1, n), rng.normal(3, 1, n)],
           "noise": rng.normal(size=2 * n)}
    return ref, ood, groups


def test_choice_combines_complementary_scores_and_beats_each_alone_on_the_worst_group():
    ref, ood, groups = _complementary()
    components, combination, record = choose(ref, ood, groups)
    assert set(components) == {"near_expert", "far_expert"}
    best_single = max(r["worst"] for r in record["single_scores"].values())
    assert best_single < 0.6 and record["chosen"]["worst"] > 0.9
    assert record["candidates_evaluated"] == 3 + 2 * (3 + 1)  # singles, pairs and the triple, two combinations
    assert record["chosen"] in record["best_candidates"] and record["references_n"] == 400
    assert record["validation_groups"] == {"far": 400, "near": 400}
    worsts = [c["worst"] for c in record["best_candidates"]]
    assert worsts == sorted(worsts, reverse=True)


def test_a_larger_set_must_gain_min_gain_over_the_best_smaller_one():
    """Parsimony: noise-level gains from a third component are not taken."""
    ref, ood, groups = _complementary(seed=3)
    components, _, record = choose(ref, ood, groups)
    triple = max((c for c in record["best_candidates"] if len(c["components"]) == 3), key=lambda c: c["worst"],
                 default=None)
    assert len(components) == 2 and record["min_gain"] == 0.005
    assert triple is None or triple["worst"] < record["chosen"]["worst"] + 0.005


def test_a_single_dominant_score_is_chosen_alone():
    rng = np.random.default_rng(1)
    groups = np.array(["near"] * 300 + ["far"] * 300, dtype=object)
    ref = {"good": rng.normal(size=300), "bad": rng.normal(size=300)}
    ood = {"good": rng.normal(6, 1, 600), "bad": rng.normal(size=600)}
    components, _, record = choose(ref, ood, groups)
    assert components == ("good",) and record["chosen"]["worst"] == pytest.approx(1.0, abs=1e-3)


def test_tail_error_is_the_pairwise_error_inside_and_the_exponential_tail_beyond():
    ids = np.arange(1.0, 101.0)
    inside = np.array([0.5, 50.0, 50.0, 100.0])
    pairs = np.mean(ids[:, None] >= inside[None, :])  # independent: every pair, ties counted as errors
    assert tail_error(ids, inside) == pytest.approx(pairs)
    tau = tail_scale(ids)
    beyond = np.array([101.0, 110.0, np.nan])
    assert tail_error(ids, beyond) == pytest.approx(np.mean([np.exp(-1 / tau) / 100, np.exp(-10 / tau) / 100, 0.0]))
    assert 0 < tail_error(ids, np.array([200.0])) < tail_error(ids, np.array([150.0]))  # never saturates at 0


def _dilution(seed):
    """'dist' separates near OOD but is weak (below ID) on far OOD; 'grad' separates far OOD perfectly. Their
    Fisher sum wins the near group but dilutes far: ID outliers of 'dist' outrank far OOD."""
    rng = np.random.default_rng(seed)
    n, m = 1000, 500
    groups = np.array(["near"] * m + ["far"] * m, dtype=object)
    ref = {"dist": rng.normal(size=n), "grad": rng.normal(size=n)}
    ood = {"dist": np.r_[rng.normal(2.5, 1, m), rng.normal(-1.0, 1, m)],
           "grad": np.r_[rng.normal(1.5, 1, m), rng.normal(5.5, 1, m)]}
    return ref, ood, groups  # independent components: min-p costs up to ~2x grad's far errors (Bonferroni)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_a_candidate_that_trades_far_ood_away_is_not_admissible(seed):
    """Known answer: min-p(dist, grad). The Fisher sum has the best worst-group AUROC (near) but several
    times grad's far errors, so it is rejected; min-p keeps far at grad's level and still wins near."""
    ref, ood, groups = _dilution(seed)
    components, combination, record = choose(ref, ood, groups)
    assert (set(components), combination) == ({"dist", "grad"}, "min-p")
    fisher = next(c for c in record["best_candidates"] if c["combination"] == "fisher" and len(c["components"]) == 2)
    assert fisher["worst"] > record["chosen"]["worst"]  # what worst-group AUROC alone would have taken
    assert fisher["error_ratio"] > 4 and fisher["error_ratio"] > 2 * record["chosen"]["error_ratio"]
    assert record["chosen"]["error_ratio"] == min(c["error_ratio"] for c in record["best_candidates"])
    assert record["chosen"]["worst"] > record["single_scores"]["grad"]["worst"] + 0.05
    if record["chosen"]["error_ratio"] <= MAX_ERROR_RATIO:  # admissible (seeds 0, 2, 3), else the least-trading
        assert record["admissible"] >= 1 and "note" not in record
    else:
        assert record["admissible"] == 0 and "smallest error ratio" in record["note"]


def test_without_an_admissible_candidate_the_least_trading_one_is_taken_and_the_record_says_so():
    """Single scores only, each the expert of one group and hopeless on the other: none is admissible; 'a' is
    far less behind 'b' on far OOD (shifted by 3 of b's 4) than 'b' is behind 'a' on near (not shifted)."""
    rng = np.random.default_rng(5)
    groups = np.array(["near"] * 300 + ["far"] * 300, dtype=object)
    ref = {"a": rng.normal(size=300), "b": rng.normal(size=300)}
    ood = {"a": np.r_[rng.normal(4, 1, 300), rng.normal(3, 1, 300)], "b": np.r_[rng.normal(0, 1, 300), rng.normal(4, 1, 300)]}
    components, _, record = choose(ref, ood, groups, max_components=1)
    assert record["admissible"] == 0 and "smallest error ratio" in record["note"]
    assert components == ("a",) and record["chosen"]["error_ratio"] > MAX_ERROR_RATIO
    assert record["chosen"]["error_ratio"] == min(c["error_ratio"] for c in record["best_candidates"])


def test_the_torch_module_computes_what_the_numpy_choice_evaluated():
    ref, ood, groups = _complementary(seed=2)
    for combination in ("fisher", "min-p"):
        fusion = PValueFusion.from_references(ref, ood, groups, components=("near_expert", "far_expert"),
                                              combination=combination)
        computed = {k: torch.as_tensor(v, dtype=torch.float32) for k, v in ood.items()}
        out = fusion(None, None, computed).numpy()
        log_p = np.stack([log_p_values(ref[n].astype(np.float32), ood[n].astype(np.float32))
                          for n in ("near_expert", "far_expert")], axis=1)
        np.testing.assert_allclose(out, combine(log_p, combination), rtol=1e-5)
        meta = fusion.metadata()
        assert meta["components"] == ["near_expert", "far_expert"] and meta["combination"] == combination
        assert meta["references_n"] == 400 and meta["selection"] == {"procedure": "fixed"}
    nan = fusion(None, None, {"near_expert": torch.tensor([np.nan]), "far_expert": torch.tensor([0.0])})
    assert float(nan[0]) == np.inf  # NaN: log p = -inf, so the fused score is not finite and the gateway flags it


def test_past_the_largest_reference_the_p_value_follows_an_exponential_tail():
    references = np.arange(1.0, 101.0)  # 1 .. 100
    tau = tail_scale(references)
    top = references[int(np.floor(0.9 * 99)):]
    assert tau == pytest.approx(np.mean(top - top[0]))
    logs = log_p_values(references, np.array([50.0, 100.0, 100.5, 110.0, np.nan]))
    np.testing.assert_allclose(logs[:2], np.log([(1 + 51) / 101, 2 / 101]))
    np.testing.assert_allclose(logs[2:4], np.log(1 / 101) - np.array([0.5, 10.0]) / tau)
    assert logs[4] == -np.inf and np.all(np.diff(logs[:4]) < 0)  # strictly more OOD further out


def test_a_small_reference_set_still_leaves_room_above_the_threshold():
    """72 references, min-p of two components: without the tail the held-out half's 95% quantile sat on the
    p-value floor and nothing could cross it."""
    rng = np.random.default_rng(0)
    ref = {"a": rng.normal(size=72), "b": rng.normal(size=72)}
    held = {"a": rng.normal(size=72), "b": rng.normal(size=72)}
    held["a"][:5] = ref["a"].max() + 0.1  # 5 of 72 (> 5%) just past every reference: the floor, without the tail
    fusion = PValueFusion.from_references(ref, ref, np.array(["x"] * 72), components=("a", "b"), combination="min-p")
    as_torch = lambda d: {k: torch.as_tensor(v, dtype=torch.float32) for k, v in d.items()}  # noqa: E731
    fused_held = np.sort(fusion(None, None, as_torch(held)).numpy())
    threshold = fused_held[int(np.ceil(0.95 * 73)) - 1]
    far = fusion(None, None, as_torch({"a": np.full(10, 8.0), "b": np.full(10, 8.0)})).numpy()
    assert np.all(far > threshold) and threshold < far.min()


def test_fixed_components_must_exist():
    ref, ood, groups = _complementary()
    with pytest.raises(ValueError, match="unknown component"):
        PValueFusion.from_references(ref, ood, groups, components=("energy",))



def test_leave_one_class_out_worlds_are_a_group_of_their_own_that_the_choice_must_not_trade_away():
    """A score that only the held-out-class worlds show to matter ('new_expert': blind to near and far OOD) joins
    the choice once the worlds are given: without them the near and far experts alone win."""
    from oodguard.export.new_classes import World

    ref, ood, groups = _complementary(seed=5)
    rng = np.random.default_rng(6)
    ref["new_expert"], ood["new_expert"] = rng.normal(size=400), rng.normal(size=800)
    worlds = []
    for c in range(3):
        references = {name: rng.normal(size=200) for name in ref}
        new = {name: rng.normal(size=30) for name in ref}
        new["new_expert"] = rng.normal(4, 1, 30)  # only this score separates the held-out class
        worlds.append(World(c, references, new))
    without, _, _ = choose(ref, ood, groups)
    assert "new_expert" not in without
    components, _, record = choose(ref, ood, groups, worlds=worlds)
    assert set(components) == {"near_expert", "far_expert", "new_expert"}
    assert record["validation_groups"] == {"far": 400, "near": 400, "new": 90}
    assert record["new_classes"]["held_out"] == [0, 1, 2] and record["new_classes"]["references_n"] == 600
    assert record["single_scores"]["new_expert"]["auroc"]["new"] > 0.95
    assert record["single_scores"]["near_expert"]["auroc"]["new"] < 0.65
    assert record["chosen"]["worst"] > 0.85 and set(record["chosen"]["tail_error"]) == {"far", "near", "new"}


def _with_rule_scores(seed=7):
    """The complementary experts renamed as the default rule's components, plus one more score."""
    ref, ood, groups = _complementary(seed=seed)
    rng = np.random.default_rng(seed)
    names = dict(zip(("near_expert", "far_expert", "noise"), NEW_CLASS_RULE[0]))
    ref = {names[n]: v for n, v in ref.items()}
    ood = {names[n]: v for n, v in ood.items()}
    ref["msp"], ood["msp"] = rng.normal(size=400), rng.normal(size=800)
    return ref, ood, groups


def test_the_default_decision_is_the_new_class_rule_and_records_its_validation_figures():
    ref, ood, groups = _with_rule_scores()
    fusion = PValueFusion.from_references(ref, ood, groups)
    components, combination = NEW_CLASS_RULE
    assert set(fusion.components) == set(components) and fusion.combination == combination == "fisher"
    record = fusion.selection
    assert "new-class rule" in record["procedure"] and set(record["required"]) == set(components)
    assert record["chosen"]["components"] == list(fusion.components) and record["chosen"]["combination"] == "fisher"
    assert record["candidates_evaluated"] == 2  # the rule's three components, each combination
    assert set(record["chosen"]["auroc"]) == {"near", "far"} and set(record["single_scores"]) == set(ref)
    assert record["chosen"]["error_ratio"] >= 1.0


def test_required_components_restrict_the_choice():
    ref, ood, groups = _complementary()
    _, _, record = choose(ref, ood, groups, required=("noise",))
    assert all("noise" in c["components"] for c in record["best_candidates"])
    assert record["candidates_evaluated"] == 1 + 2 * (2 + 1)  # noise alone, with each other, the triple
    assert set(record["chosen"]["components"]) == {"noise", "near_expert", "far_expert"}


def test_without_the_rule_scores_the_choice_is_validated():
    ref, ood, groups = _with_rule_scores()
    partial = {n: v for n, v in ref.items() if n != NEW_CLASS_RULE[0][1]}
    fusion = PValueFusion.from_references(partial, {n: ood[n] for n in partial}, groups)
    assert "admissible candidates" in fusion.selection["procedure"] and fusion.selection["required"] == []
