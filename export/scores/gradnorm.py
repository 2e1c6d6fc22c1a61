"""GradNorm (Huang et al. 2021) in closed form for a linear head, negated so that higher = more OOD.

The KL divergence to the uniform distribution has gradient ``(p - 1/K) h^T`` w.r.t. the head's weight,
whose L1 norm is ``||h||_1 * sum_c |p_c - 1/K|``. We use the form of the method note,
``||h||_1 * sum_c |K p_c - 1| / T`` with T = 1 (K times larger; the ranking is the same), and negate it:
GradNorm is high for in-distribution inputs.
"""

import torch

from .base import Score


class GradNorm(Score):
    name = "gradnorm"

    def forward(self, logits, features, computed):
        num_classes = logits.shape[1]
        p = torch.softmax(logits, dim=1)
        return -features.abs().sum(dim=1) * (num_classes * p - 1.0).abs().sum(dim=1)
