import numpy as np
import pytest
from scipy.special import logsumexp

from oodguard.export.scores.sisome import Sisome


def test_sisome_combines_normalised_energy_and_ratio(digits_export, scored):
    _, result, _, _ = digits_export
    outputs, _ = scored
    stats = result.calibration.model["score_params"]["sisome"]
    r_avg = stats["r_avg"]
    assert r_avg == pytest.approx(result.calibration.model["score_params"]["sisom"]["r_avg"])
    energy = -logsumexp(outputs["logits"].astype(np.float64), axis=1)
    expected = (min(r_avg, 1.0) * (energy - stats["mu_E"]) / stats["sd_E"]
                + max(1.0 - r_avg, 0.0) * (outputs["sisom"] - stats["mu_r"]) / stats["sd_r"])
    np.testing.assert_allclose(outputs["sisome"], expected, rtol=1e-4, atol=1e-4)


def test_weights_follow_r_avg():
    """r_avg >= 1 (entangled latent space): energy only; r_avg = 0: the ratio only."""
    import torch

    logits = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    ratio = torch.tensor([0.5, 3.0])
    energy = -torch.logsumexp(logits, dim=1)
    entangled = Sisome(r_avg=1.5, mu_r=1.0, sd_r=2.0, mu_e=-1.0, sd_e=0.5)
    np.testing.assert_allclose(entangled(logits, None, {"sisom": ratio}).numpy(), ((energy + 1.0) / 0.5).numpy(), rtol=1e-6)
    separable = Sisome(r_avg=0.0, mu_r=1.0, sd_r=2.0, mu_e=-1.0, sd_e=0.5)
    np.testing.assert_allclose(separable(logits, None, {"sisom": ratio}).numpy(), ((ratio - 1.0) / 2.0).numpy(), rtol=1e-6)


def test_sisome_needs_sisom_first():
    with pytest.raises(ValueError, match="sisom"):
        Sisome.fit(None, {})
