"""SISOMe: SISOM self-balanced with energy (method note, section 5).

``SISOMe = min(r_avg, 1) * (E - mu_E) / sd_E + max(1 - r_avg, 0) * (r - mu_r) / sd_r`` with
``E = -logsumexp(z)`` and ``r`` the SISOM ratio. ``r_avg``, ``mu_r``, ``sd_r`` come from the bank's
leave-one-out ratios and ``mu_E``, ``sd_E`` from the bank's energies. The ratio term is normalised by its
own standard deviation ``sd_r`` (the authors' code divides both terms by ``sd_E``, almost surely a slip).
A separable latent space (small ``r_avg``) leans on the ratio; an entangled one on energy.
"""

import numpy as np
import torch

from .base import Score


class Sisome(Score):
    name = "sisome"
    uses_bank = True  # its ratio term is SISOM's
    ratio_score = "sisom"  # the score whose ratio it balances

    def __init__(self, r_avg: float, mu_r: float, sd_r: float, mu_e: float, sd_e: float):
        super().__init__()
        self.stats = {"r_avg": r_avg, "mu_r": mu_r, "sd_r": sd_r, "mu_E": mu_e, "sd_E": sd_e}
        self.weight_energy = min(r_avg, 1.0) / sd_e
        self.weight_ratio = max(1.0 - r_avg, 0.0) / sd_r

    @classmethod
    def fit(cls, data, fitted):
        if cls.ratio_score not in fitted:
            raise ValueError(f"{cls.name} needs the {cls.ratio_score} score fitted first")
        loo_r = fitted[cls.ratio_score].info["loo_r"]
        z = data.logits[data.bank].astype(np.float64)
        top = z.max(axis=1)
        energy = -(top + np.log(np.exp(z - top[:, None]).sum(axis=1)))
        return cls(float(loo_r.mean()), float(loo_r.mean()), max(float(loo_r.std()), 1e-12),
                   float(energy.mean()), max(float(energy.std()), 1e-12))

    def forward(self, logits, features, computed):
        # float64: a small sd_E magnifies float32 rounding of the energy (1e-4 seen with sd_E = 0.002).
        energy = -torch.logsumexp(logits.double(), dim=1)
        ratio = computed[self.ratio_score].double()
        combined = self.weight_energy * (energy - self.stats["mu_E"]) + self.weight_ratio * (ratio - self.stats["mu_r"])
        return combined.float()

    def metadata(self):
        return dict(self.stats)
