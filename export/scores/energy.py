"""Energy score (Liu et al. 2020): ``-T * logsumexp(z / T)`` with T = 1. Higher = more OOD."""

import torch

from .base import Score


class Energy(Score):
    name = "energy"

    def forward(self, logits, features, computed):
        return -torch.logsumexp(logits, dim=1)
