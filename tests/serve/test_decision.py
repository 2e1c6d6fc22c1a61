import itertools

import numpy as np
import pytest

from oodguard.calibration import Calibration, ScoreThreshold
from oodguard.serve.decision import DecisionPolicy, DecisionRule, PolicyError


def decide(outputs, cal, policy):
    return DecisionRule(cal, policy)(outputs)

NAMES = ("a", "b", "c")
N = 19


def calibration(names=NAMES) -> Calibration:
    # calibration scores 0, 1, ..., 18; threshold 10 for every score
    thresholds = {
        n: ScoreThreshold(n, 10.0, 0.95, N, 11, 11 / N, (0.3, 0.8), np.arange(N, dtype=np.float64)) for n in names
    }
    model = {"name": "toy", "class_names": ["x", "y"], "input": {}, "preprocessing": {}, "scores": list(names)}
    return Calibration(model=model, thresholds=thresholds, data={})


def outputs_for(patterns) -> dict:
    """patterns: list of tuples of bools (crossed per score) → score arrays (15 crosses, 5 does not)."""
    arr = np.array(patterns, dtype=bool)
    return {n: np.where(arr[:, j], 15.0, 5.0).astype(np.float32) for j, n in enumerate(NAMES)} | {
        "logits": np.zeros((len(arr), 2), np.float32)}


def test_every_subset_mode_and_pattern_matches_the_rule():
    patterns = list(itertools.product([False, True], repeat=3))
    outputs = outputs_for(patterns)
    cal = calibration()
    for size in (1, 2, 3):
        for subset in itertools.combinations(NAMES, size):
            for mode in ("any", "all"):
                verdicts = decide(outputs, cal, DecisionPolicy(subset, mode))
                assert len(verdicts) == 8
                for pattern, verdict in zip(patterns, verdicts):
                    crossed = {n for n, c in zip(NAMES, pattern) if c}
                    expected = (any if mode == "any" else all)(n in crossed for n in subset)
                    assert verdict.ood == expected, (subset, mode, pattern)
                    assert verdict.crossed == tuple(n for n in NAMES if n in crossed)
                    assert verdict.deciding == subset and verdict.mode == mode
                    assert verdict.thresholds == {n: 10.0 for n in NAMES}


def test_threshold_is_strict_and_p_values_follow_the_conformal_formula():
    cal = calibration()
    values = np.array([-1.0, 0.0, 9.5, 10.0, 10.0001, 18.0, 99.0], np.float32)
    verdicts = decide({n: values for n in NAMES}, cal, DecisionPolicy(("a",)))
    assert [v.ood for v in verdicts] == [False, False, False, False, True, True, True]
    calib = np.arange(N)
    for value, verdict in zip(values, verdicts):
        expected = (1 + np.sum(calib >= float(value))) / (N + 1)
        assert verdict.p_values["a"] == pytest.approx(expected)
        assert verdict.scores["a"] == pytest.approx(float(value))
    assert verdicts[0].p_values["a"] == 1.0 and verdicts[-1].p_values["a"] == pytest.approx(1 / 20)


def test_to_dict_is_json_ready():
    import json

    verdict = decide(outputs_for([(True, False, True)]), calibration(), DecisionPolicy(("a", "b"), "all"))[0]
    data = json.loads(json.dumps(verdict.to_dict()))
    assert data["ood"] is False and data["crossed"] == ["a", "c"] and data["deciding"] == ["a", "b"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(scores=()), "names no score"),
    (dict(scores=("a", "a")), "repeats"),
    (dict(scores=("a",), mode="most"), "'any' or 'all'"),
    (dict(scores="sisome"), "sequence of names"),
])
def test_invalid_policies_are_refused(kwargs, message):
    with pytest.raises(PolicyError, match=message):
        DecisionPolicy(**kwargs)


def test_unknown_score_names_what_the_model_exports():
    with pytest.raises(PolicyError) as info:
        decide(outputs_for([(True, True, True)]), calibration(), DecisionPolicy(("sisome",)))
    assert "['sisome']" in str(info.value) and "['a', 'b', 'c']" in str(info.value)
    with pytest.raises(PolicyError, match="not exported by the model"):
        DecisionPolicy(("a", "z")).validate(NAMES)
    DecisionPolicy(("a", "c")).validate(NAMES)


def test_missing_score_output_is_an_error():
    outputs = outputs_for([(True, True, True)])
    del outputs["b"]
    with pytest.raises(PolicyError, match=r"lack score\(s\) \['b'\]"):
        decide(outputs, calibration(), DecisionPolicy(("a",)))


def test_score_outputs_of_different_batch_sizes_are_an_error():
    outputs = outputs_for([(True, False, True), (False, False, False)])
    outputs["c"] = outputs["c"][:1]
    with pytest.raises(PolicyError, match=r"disagree on the batch size: \{'a': 2, 'b': 2, 'c': 1\}"):
        decide(outputs, calibration(), DecisionPolicy(("a",)))


def test_scores_shaped_b_by_1_decide_like_flat_ones():
    # Triton may answer [B, 1] per score; the rule reads any shape with B values
    flat = outputs_for([(True, False, True), (False, True, False)])
    column = {n: v.reshape(-1, 1) if n in NAMES else v for n, v in flat.items()}
    rule = DecisionRule(calibration(), DecisionPolicy(("a", "b"), "any"))
    a, b = rule(flat), rule(column)
    assert b.scores.shape == (2, 3) and b.scores.tolist() == a.scores.tolist()
    assert b.ood.tolist() == a.ood.tolist() == [True, True] and b.p_values.tolist() == a.p_values.tolist()


def test_small_and_large_batches_give_the_same_decisions_and_p_values():
    # batches of up to BISECT_MAX_ROWS rows take the bisect path, larger ones NumPy's searchsorted
    from oodguard.serve.decision import BISECT_MAX_ROWS, DecisionRule

    rule = DecisionRule(calibration(), DecisionPolicy(("a", "c"), "all"))
    values = np.array([-1.0, 0.0, 3.0, 9.5, 10.0, 10.0001, 17.99, 18.0, 18.5, 99.0], np.float32)
    outputs = {n: np.roll(values, j) for j, n in enumerate(NAMES)}
    whole = rule(outputs)
    assert len(values) > BISECT_MAX_ROWS
    for i in range(len(values)):
        one = rule({n: v[i:i + 1] for n, v in outputs.items()})
        assert one.p_values.tolist() == whole.p_values[i:i + 1].tolist()
        assert one.ood.tolist() == whole.ood[i:i + 1].tolist() and one.crossed.tolist() == whole.crossed[i:i + 1].tolist()
    calib = np.arange(N)
    expected = [[(1 + np.sum(calib >= float(v[i]))) / (N + 1) for v in outputs.values()] for i in range(len(values))]
    np.testing.assert_allclose(whole.p_values, expected)
    # slicing keeps the columns of those rows
    part = whole[2:5]
    assert len(part) == 3 and part[0] == whole[2] and part.scores.shape == (3, 3)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_non_finite_score_fails_closed(bad):
    # NaN > threshold is False: a plain comparison would answer "in-distribution" for an item nobody scored
    outputs = outputs_for([(False, False, False)] * 3 + [(True, False, False)])
    outputs["b"] = outputs["b"].copy()
    outputs["b"][1] = bad  # a score that does not decide
    outputs["a"] = outputs["a"].copy()
    outputs["a"][2] = bad  # the deciding score
    d = DecisionRule(calibration(), DecisionPolicy(("a",)))(outputs)
    assert d.ood.tolist() == [False, True, True, True]
    assert d.unscorable.tolist() == [False, True, True, False]
    assert [d.reasons(i) for i in range(4)] == [(), ("unscorable",), (("threshold", "unscorable") if bad == np.inf
                                                                         else ("unscorable",)), ("threshold",)]
    assert d[1].to_dict()["reasons"] == ["unscorable"] and d[1:3].unscorable.tolist() == [True, True]
    if bad != bad:  # NaN: the smallest p-value, unlike any calibration score
        assert d.p_values[2, 0] == pytest.approx(1 / (N + 1))


def test_items_out_of_the_input_range_are_flagged_with_their_reason():
    outputs = outputs_for([(False, False, False), (True, False, False), (False, False, False)])
    rule = DecisionRule(calibration(), DecisionPolicy(("a",)))
    d = rule(outputs, np.array([False, True, True]))
    assert d.ood.tolist() == [False, True, True] and d.by_policy.tolist() == [False, True, False]
    assert [d.reasons(i) for i in range(3)] == [(), ("threshold", "input_range"), ("input_range",)]
    with pytest.raises(PolicyError, match=r"out_of_range has shape \(2,\), expected \(3,\)"):
        rule(outputs, np.array([False, True]))


def test_input_range_follows_the_preprocessing_with_its_margin():
    from oodguard.serve.decision import InputRange

    # MNIST-like normalisation: pixels in [0, 1] become [(0 - 0.1307) / 0.3081, (1 - 0.1307) / 0.3081]
    low, high = -0.1307 / 0.3081, (1 - 0.1307) / 0.3081
    span = high - low
    check = InputRange((0.1307,), (0.3081,), margin=0.5)
    np.testing.assert_allclose([check.low[0], check.high[0]], [low - span / 2, high + span / 2], rtol=1e-6)
    x = np.zeros((5, 1, 4, 4), np.float32)
    x[0] = low  # a black image
    x[1] = high  # a white one
    x[2, 0, 0, 0] = high + 0.49 * span  # within the margin
    x[3, 0, 3, 3] = high + 0.51 * span  # beyond it
    x[4, 0, 1, 2] = low - 0.51 * span
    assert check.outside(x).tolist() == [False, False, False, True, True]
    assert InputRange((0.1307,), (0.3081,), margin=float("inf")).outside(x).tolist() == [False] * 5
    # per channel: the second channel has its own range
    rgb = InputRange((0.5, 0.0), (0.5, 1.0), margin=0.0)
    y = np.zeros((2, 2, 1, 1), np.float32)
    y[0, 1] = 1.0
    y[1, 1] = 1.01
    assert rgb.outside(y).tolist() == [False, True]


def test_the_default_policy_decides_by_fused_and_names_its_driver():
    """Default: fused decides; the driver is the fused component with the smallest p-value."""
    cal = calibration(("a", "b", "fused"))
    cal.model["score_params"] = {"fused": {"components": ["a", "b"], "combination": "fisher"}}
    values = {"a": np.array([17.0, 3.0, 2.0], np.float32), "b": np.array([12.0, 18.0, 1.0], np.float32),
              "fused": np.array([11.0, 11.0, 0.0], np.float32)}
    rule = DecisionRule(cal, DecisionPolicy())
    assert rule.policy.scores == ("fused",) and not rule.fell_back
    verdicts = rule(values)
    assert [v.ood for v in verdicts] == [True, True, False]
    assert [v.driver for v in verdicts] == ["a", "b", "a"]  # p(a) 3/20 < p(b) 8/20; p(b) 2/20; 18/20 < 19/20
    assert verdicts[0].to_dict()["driver"] == "a" and verdicts[0].deciding == ("fused",)


def test_a_version_without_fused_falls_back_and_names_no_driver():
    rule = DecisionRule(calibration(("a", "sisome")), DecisionPolicy())
    assert rule.fell_back and rule.policy == DecisionPolicy(("sisome",), "any", ())
    verdict = rule({"a": np.array([15.0], np.float32), "sisome": np.array([15.0], np.float32)})[0]
    assert verdict.ood and verdict.deciding == ("sisome",) and verdict.driver == ""
    assert "driver" not in verdict.to_dict()
    with pytest.raises(PolicyError, match=r"\['fused'\] not exported"):
        DecisionRule(calibration(("a", "sisome")), DecisionPolicy(("fused",), "any", ()))
    with pytest.raises(PolicyError, match=r"\['fused'\] not exported"):  # the fallback does not fit either
        DecisionRule(calibration(("a",)), DecisionPolicy())
    assert DecisionPolicy().describe() == "any(fused), else any(sisome)"


@pytest.mark.parametrize("policy", [DecisionPolicy(("a",)), DecisionPolicy(("a", "c"), "any"),
                                    DecisionPolicy(("a", "b", "c"), "all")])
def test_a_single_row_is_decided_as_within_any_batch(policy):
    # one row takes a Python path of its own: every array, verdict, reason and driver must be that row's in a
    # batch of a few rows (bisect) and in a large one (NumPy's searchsorted), non-finite scores and ties included
    from oodguard.serve.decision import BISECT_MAX_ROWS

    rule = DecisionRule(calibration(), policy)
    rng = np.random.default_rng(0)
    values = np.array([-1.0, 0.0, 3.0, 9.5, 10.0, 10.5, 18.0, 25.0, np.nan, np.inf, -np.inf], np.float32)
    for _ in range(100):
        rows = BISECT_MAX_ROWS + 3
        outputs = {n: rng.choice(values, size=rows) for n in NAMES}
        out_of_range = rng.random(rows) < 0.3
        with np.errstate(invalid="ignore"):
            large = rule(outputs, out_of_range)
            few = rule({n: v[:3] for n, v in outputs.items()}, out_of_range[:3])
        for i in range(3):
            row = {n: v[i:i + 1] for n, v in outputs.items()}
            one = rule(row, out_of_range[i:i + 1])
            for batch in (large, few):
                for field in ("scores", "crossed", "p_values", "by_policy", "unscorable", "out_of_range", "ood"):
                    a, b = getattr(one, field), getattr(batch, field)[i:i + 1]
                    assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b, equal_nan=True), field
                assert one[0].to_dict() == batch[i].to_dict()
            alone = rule(row)  # no input-range flags given: none
            assert alone.out_of_range.tolist() == [False] and alone.ood.tolist() == [bool(one.by_policy[0] or one.unscorable[0])]
    # every verdict of the rule (one row, a few, many, a slice) holds the rule's one thresholds dict: the query
    # queue encodes it once per write
    verdicts = [one[0], few[1], large[2], large[1:3][0]]
    assert all(v.thresholds is verdicts[0].thresholds for v in verdicts)
    assert verdicts[0].thresholds == dict(zip(rule.names, rule.thresholds.tolist()))


def test_the_input_range_fast_path_flags_exactly_what_the_per_channel_check_does():
    from oodguard.serve.decision import InputRange

    rng = np.random.default_rng(1)
    # one channel; three channels with ranges that overlap; two channels whose ranges do not overlap at all
    for mean, std in (((0.1307,), (0.3081,)), ((0.5, 0.4, 0.3), (0.2, 0.3, 0.25)), ((0.0, 5.0), (0.1, 0.1))):
        check = InputRange(mean, std, margin=0.5)
        for _ in range(50):
            x = rng.uniform(check.low.min() - 1, check.high.max() + 1, size=(3, len(mean), 4, 4)).astype(np.float32)
            if rng.random() < 0.5:  # most traffic: every item well inside its channels' ranges
                x = np.clip(x, check.low[None, :, None, None], check.high[None, :, None, None])
            flat = x.reshape(len(x), len(mean), -1)
            expected = (flat.min(axis=2) < check.low).any(axis=1) | (flat.max(axis=2) > check.high).any(axis=1)
            assert check.outside(x).tolist() == expected.tolist()
