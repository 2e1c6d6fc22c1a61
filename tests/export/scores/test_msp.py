import numpy as np

from .conftest import softmax


def test_msp_is_negative_max_softmax(scored):
    outputs, _ = scored
    expected = -softmax(outputs["logits"]).max(axis=1)
    np.testing.assert_allclose(outputs["msp"], expected, atol=1e-6)
    assert np.all((outputs["msp"] >= -1.0) & (outputs["msp"] <= -1.0 / outputs["logits"].shape[1] + 1e-6))
