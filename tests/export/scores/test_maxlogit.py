import numpy as np


def test_maxlogit_is_negative_max_logit(scored):
    outputs, _ = scored
    np.testing.assert_allclose(outputs["maxlogit"], -outputs["logits"].max(axis=1), atol=1e-6)
