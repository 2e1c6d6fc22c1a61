"""ScoreThreshold decisions and conformal p-values; calibration.json roundtrip and its validation errors."""

from __future__ import annotations

import json
from pathlib import Path
import numpy as np
import pytest

from oodguard.calibration import FORMAT, Calibration, CalibrationError, ScoreThreshold


def threshold_over(scores: np.ndarray, threshold: float, name: str = "energy") -> ScoreThreshold:
    ordered = np.sort(np.asarray(scores, np.float64))
    accepted = int(np.count_nonzero(ordered <= threshold))
    return ScoreThreshold(
        name=name, threshold=threshold, target_tpr=0.95, n=len(ordered), accepted=accepted,
        achieved_tpr=accepted / len(ordered), achieved_tpr_ci95=(0.5, 0.99), sorted_scores=ordered,
    )


def brute_force_p_values(calibration: np.ndarray, scores: np.ndarray) -> np.ndarray:
    return np.array([(1 + np.sum(calibration >= s)) / (len(calibration) + 1) for s in scores])


def sample_calibration() -> Calibration:
    model = {
        "class_names": ["0", "1", "2"],
        "input": {"name": "input", "shape": [1, 8, 8], "dtype": "float32"},
        "preprocessing": {"channels": 1, "height": 8, "width": 8, "mean": [0.5], "std": [0.25]},
        "scores": ["energy", "msp"],
    }
    thresholds = {
        "energy": threshold_over(np.array([-3.0, -2.5, -2.5, 0.25, 1.0]), -2.5, "energy"),
        "msp": threshold_over(np.array([-0.9, -0.8, -0.1]), -0.1, "msp"),
    }
    return Calibration(model=model, thresholds=thresholds, data={"source": "digits", "n": 5})


# --- ScoreThreshold ------------------------------------------------------------------------------------


def test_is_ood_is_strictly_greater_than_threshold():
    threshold = threshold_over(np.arange(10.0), 4.5)
    assert threshold.is_ood(np.array([4.0, 4.5, 4.5000001, 100.0, -1.0])).tolist() == [False, False, True, True, False]
    assert threshold.is_ood(4.5).item() is False


@pytest.mark.parametrize("seed", range(3))
def test_p_values_match_brute_force_on_continuous_scores(seed):
    rng = np.random.default_rng(seed)
    calibration = rng.normal(size=57)
    queries = np.r_[rng.normal(size=40), calibration[:10], calibration.min() - 1, calibration.max() + 1]
    p = threshold_over(calibration, 0.0).p_values(queries)
    np.testing.assert_allclose(p, brute_force_p_values(calibration, queries), rtol=0, atol=1e-15)


def test_p_values_match_brute_force_with_ties():
    rng = np.random.default_rng(9)
    calibration = rng.integers(0, 6, 40).astype(np.float64)
    queries = np.arange(-1.0, 8.0, 0.5)
    p = threshold_over(calibration, 3.0).p_values(queries)
    np.testing.assert_allclose(p, brute_force_p_values(calibration, queries), rtol=0, atol=1e-15)


def test_p_values_by_hand():
    threshold = threshold_over(np.array([1.0, 2.0, 2.0, 3.0]), 2.0)  # n = 4
    p = threshold.p_values(np.array([0.0, 1.0, 2.0, 2.5, 3.0, 9.0]))
    np.testing.assert_allclose(p, np.array([5, 5, 4, 2, 2, 1]) / 5)


# --- Calibration roundtrip -----------------------------------------------------------------------------


def assert_same_calibration(a: Calibration, b: Calibration) -> None:
    assert a.model == b.model and a.data == b.data
    assert list(a.thresholds) == list(b.thresholds)
    for name, t in a.thresholds.items():
        u = b.thresholds[name]
        assert (t.name, t.threshold, t.target_tpr, t.n, t.accepted, t.achieved_tpr, t.achieved_tpr_ci95) == (
            u.name, u.threshold, u.target_tpr, u.n, u.accepted, u.achieved_tpr, u.achieved_tpr_ci95
        )
        np.testing.assert_array_equal(t.sorted_scores, u.sorted_scores)


def test_to_dict_layout():
    raw = sample_calibration().to_dict()
    assert raw["format"] == FORMAT and set(raw) == {"format", "model", "calibration_data", "scores"}
    energy = raw["scores"]["energy"]
    assert energy["direction"] == "higher_is_ood"
    assert (energy["threshold"], energy["n"], energy["accepted"]) == (-2.5, 5, 3)
    assert energy["sorted_scores"] == [-3.0, -2.5, -2.5, 0.25, 1.0]


def test_save_and_load_roundtrip(tmp_path):
    original = sample_calibration()
    path = tmp_path / "calibration.json"
    original.save(path)
    loaded = Calibration.load(path)
    assert_same_calibration(original, loaded)
    assert loaded.class_names == ["0", "1", "2"]
    assert loaded.thresholds["energy"].p_values(np.array([0.0])).tolist() == [3 / 6]
    assert_same_calibration(original, Calibration.from_dict(original.to_dict()))


# --- load errors ---------------------------------------------------------------------------------------


DROP = object()


def write_broken(tmp_path: Path, keys: tuple[str, ...], value) -> Path:
    """A valid calibration file with the entry at ``keys`` replaced by ``value`` (or removed, for DROP)."""
    raw = sample_calibration().to_dict()
    parent = raw
    for key in keys[:-1]:
        parent = parent[key]
    if value is DROP:
        del parent[keys[-1]]
    else:
        parent[keys[-1]] = value
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps(raw))
    return path


def test_missing_file(tmp_path):
    with pytest.raises(CalibrationError, match="no calibration file"):
        Calibration.load(tmp_path / "calibration.json")


def test_invalid_json(tmp_path):
    path = tmp_path / "calibration.json"
    path.write_text('{"format": ')
    with pytest.raises(CalibrationError, match="not valid JSON"):
        Calibration.load(path)


@pytest.mark.parametrize("content", [b"\xff\xfe\x00garbage", None], ids=["not-utf8", "a-folder"])
def test_unreadable_file(tmp_path, content):
    path = tmp_path / "calibration.json"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    with pytest.raises(CalibrationError, match="cannot read"):
        Calibration.load(path)


BROKEN = {
    "wrong format": (("format",), "oodguard.calibration/0", "not an oodguard calibration"),
    "no model section": (("model",), DROP, "no 'model' section"),
    "no scores section": (("scores",), DROP, "no 'scores' section"),
    "no data section": (("calibration_data",), DROP, "no 'calibration_data' section"),
    "model not an object": (("model",), ["energy"], "'model' section is not an object"),
    "scores not an object": (("scores",), ["energy"], "'scores' section is not an object"),
    "no preprocessing": (("model", "preprocessing"), DROP, "model section has no 'preprocessing'"),
    "listed score without entry": (("scores", "msp"), DROP, r"no threshold for score\(s\) \['msp'\]"),
    "entry without threshold": (("scores", "msp", "threshold"), DROP, "'msp': malformed entry.*'threshold'"),
    "entry not an object": (("scores", "msp"), 0.5, "'msp': malformed entry"),
    "non-numeric threshold": (("scores", "msp", "threshold"), "high", "'msp': malformed entry"),
    "infinite threshold": (("scores", "msp", "threshold"), float("inf"), "'msp': threshold not finite"),
    "n mismatch": (("scores", "energy", "n"), 6, "'energy': n=6 but 5 calibration scores"),
    "unsorted scores": (("scores", "energy", "sorted_scores"), [-3.0, 0.25, -2.5, -2.5, 1.0], "not sorted"),
    "wrong direction": (("scores", "energy", "direction"), "lower_is_ood", "'energy': direction 'lower_is_ood'"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_load_errors_name_the_problem(tmp_path, case):
    keys, value, message = BROKEN[case]
    path = write_broken(tmp_path, keys, value)
    with pytest.raises(CalibrationError, match=message) as caught:
        Calibration.load(path)
    assert str(caught.value).startswith(f"{path}: ")


@pytest.mark.parametrize("content", ["[]", '"calibration"', "{}"])
def test_load_of_json_that_is_not_a_calibration(tmp_path, content):
    path = tmp_path / "calibration.json"
    path.write_text(content)
    with pytest.raises(CalibrationError, match="not an oodguard calibration file"):
        Calibration.load(path)
