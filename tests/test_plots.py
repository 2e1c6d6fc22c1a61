"""oodguard.plots: the score figure of `oodguard evaluate --plot` and the MNIST benchmark."""

import numpy as np
from PIL import Image

from oodguard.cli import main
from oodguard.plots import score_figure


def test_one_histogram_and_one_roc_panel_per_score(tmp_path):
    rng = np.random.default_rng(0)
    names = [f"s{i}" for i in range(5)]  # two rows of four: histograms, then two of ROC curves
    in_dist = {n: rng.normal(size=200) for n in names}
    ood = {"far": {n: rng.normal(3, 1, size=100) for n in names}}
    path = score_figure(names, {n: 1.64 for n in names}, in_dist, ood, tmp_path / "sub" / "scores.png")
    width, height = Image.open(path).size
    assert path.exists() and width == 20 * 80 and height == 4 * 8 * 80 // 2  # 4 rows of 8 inches at 80 dpi


def test_evaluate_plot_writes_the_figure(digits_export, tmp_path, capsys):
    _, _, repository, _ = digits_export
    assert main(["evaluate", "--repository", str(repository), "--model", "digits", "--id", "digits", "--classes", "0-7",
                 "--ood", "noise=synthetic:uniform:100:far", "--plot", str(tmp_path / "plots")]) == 0
    assert f"wrote {tmp_path / 'plots' / 'scores.png'}" in capsys.readouterr().err
    assert Image.open(tmp_path / "plots" / "scores.png").size[0] == 1600


def test_float32_scores_with_infinities_plot_without_overflow_warnings(tmp_path):
    """The ROC panel maps +inf and NaN (fail closed: most OOD) to the top of the float range, in float64: NaN
    made sklearn refuse the curve, and casting 1e300 into a float32 array warned once per panel."""
    import warnings

    rng = np.random.default_rng(1)
    in_dist = {"s": rng.normal(size=50).astype(np.float32)}
    ood = {"far": {"s": np.r_[rng.normal(3, 1, size=20), np.inf, np.nan].astype(np.float32)}}
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert score_figure(["s"], {"s": 1.0}, in_dist, ood, tmp_path / "scores.png").exists()
