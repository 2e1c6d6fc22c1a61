import numpy as np
import pytest
from scipy.special import logsumexp

from oodguard.export.scores.sisome_ml import SisomeMl


def test_sisome_ml_balances_energy_with_the_multi_layer_ratio(digits_export_ml, scored_ml):
    _, result, _, _ = digits_export_ml
    outputs, _ = scored_ml
    params = result.calibration.model["score_params"]
    stats = params["sisome_ml"]
    assert stats["r_avg"] == pytest.approx(params["sisom_ml"]["r_avg"])
    assert stats["r_avg"] != pytest.approx(params["sisom"]["r_avg"])  # not the penultimate score's statistics
    energy = -logsumexp(outputs["logits"].astype(np.float64), axis=1)
    r_avg = stats["r_avg"]
    expected = (min(r_avg, 1.0) * (energy - stats["mu_E"]) / stats["sd_E"]
                + max(1.0 - r_avg, 0.0) * (outputs["sisom_ml"] - stats["mu_r"]) / stats["sd_r"])
    np.testing.assert_allclose(outputs["sisome_ml"], expected, rtol=1e-4, atol=1e-4)


def test_sisome_ml_needs_sisom_ml_first():
    with pytest.raises(ValueError, match="sisome_ml needs the sisom_ml score"):
        SisomeMl.fit(None, {"sisom": object()})
