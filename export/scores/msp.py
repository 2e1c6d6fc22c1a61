"""Maximum softmax probability (Hendrycks & Gimpel 2017), negated: ``-max_k softmax(z)_k``."""

import torch

from .base import Score


class Msp(Score):
    name = "msp"

    def forward(self, logits, features, computed):
        return -torch.softmax(logits, dim=1).amax(dim=1)
