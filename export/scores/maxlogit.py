"""Maximum logit (Hendrycks et al. 2022), negated: ``-max_k z_k``."""

from .base import Score


class MaxLogit(Score):
    name = "maxlogit"

    def forward(self, logits, features, computed):
        return -logits.amax(dim=1)
