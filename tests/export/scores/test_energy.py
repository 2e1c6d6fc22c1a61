import numpy as np
from scipy.special import logsumexp


def test_energy_is_negative_logsumexp_of_the_onnx_logits(scored):
    outputs, _ = scored
    np.testing.assert_allclose(outputs["energy"], -logsumexp(outputs["logits"].astype(np.float64), axis=1), rtol=1e-5, atol=1e-5)
