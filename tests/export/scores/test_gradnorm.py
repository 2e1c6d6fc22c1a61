import numpy as np

from .conftest import softmax


def test_gradnorm_is_negative_l1_norm_of_the_kl_gradient(scored):
    outputs, _ = scored
    z, h = outputs["logits"], outputs["features"].astype(np.float64)
    k = z.shape[1]
    expected = -np.abs(h).sum(axis=1) * np.abs(k * softmax(z) - 1.0).sum(axis=1)
    np.testing.assert_allclose(outputs["gradnorm"], expected, rtol=1e-5)


def test_gradnorm_equals_k_times_the_weight_gradient_norm(scored):
    """The closed form is K * ||d KL(u || p) / dW||_1 with dL/dW = (p - 1/K) h^T."""
    outputs, _ = scored
    z, h = outputs["logits"][:5], outputs["features"][:5].astype(np.float64)
    k = z.shape[1]
    for i in range(5):
        grad_w = np.outer(softmax(z[i : i + 1])[0] - 1.0 / k, h[i])
        np.testing.assert_allclose(-outputs["gradnorm"][i], k * np.abs(grad_w).sum(), rtol=1e-5)
