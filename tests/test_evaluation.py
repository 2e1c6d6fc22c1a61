import numpy as np

from oodguard.evaluation import VersionScorer, compare, uniform_noise
from oodguard.metrics import auroc


def test_compare_reports_metrics_from_the_onnx_scores(digits_export):
    record, result, _, _ = digits_export
    scorer = VersionScorer(result.version_dir)
    in_dist = scorer.score("id", record.part(record.dataset(), "test"))
    noise = scorer.score("noise", uniform_noise(100, (8, 8)))
    assert noise.conversion == ["resize 8x8 -> 28x28 (bilinear)"]
    rows = compare(scorer, in_dist, noise)
    assert set(rows) == set(scorer.score_names)
    for name, row in rows.items():
        assert row["auroc"] == auroc(in_dist.scores[name], noise.scores[name])
        threshold = scorer.calibration.thresholds[name].threshold
        assert row["calibrated_tpr"] == np.mean(in_dist.scores[name] <= threshold)
        assert row["calibrated_fpr"] == np.mean(noise.scores[name] <= threshold)


def test_uniform_noise_is_seeded_uint8():
    a, b = uniform_noise(5, (8, 8), seed=2), uniform_noise(5, (8, 8), seed=2)
    assert a.images.dtype == np.uint8 and a.images.shape == (5, 8, 8)
    np.testing.assert_array_equal(a.images, b.images)
