"""Relative Mahalanobis distance (Ren et al. 2021, "A simple fix to Mahalanobis distance for improving near-OOD
detection"): ``min_c MD_c(h) - MD_0(h)``.

``MD_c(h) = (h - mu_c)^T P (h - mu_c)`` is the Mahalanobis distance to class ``c``'s mean under one covariance
shared by the classes (Lee et al. 2018; the method note's optional ``mahalanobis``), ``P`` its precision;
``MD_0`` the distance under one Gaussian fitted to all training features, the *background*. The plain minimum
also grows along the directions every image varies in (brightness, stroke width), which says little about
the class; subtracting the background's distance removes that part and keeps what is specific to the classes,
which is where an unseen class of the same domain differs (docs/methods.md#new-classes).

Fitted on every training feature (not only the bank), with scikit-learn's empirical covariance (its
precision is the pseudo-inverse, so dead ReLU units cost nothing). The input is compared with its *nearest*
class mean, never with a true label.
"""

import numpy as np
import torch
from sklearn.covariance import EmpiricalCovariance

from .base import Score, buffer


class RelativeMahalanobis(Score):
    name = "rel_mahalanobis"

    def __init__(self, means: np.ndarray, precision: np.ndarray, background_mean: np.ndarray,
                 background_precision: np.ndarray):
        super().__init__()
        means = np.asarray(means, np.float64) - background_mean  # distances are taken around the background mean
        precision = np.asarray(precision, np.float64)
        # float64 in the graph: the expanded form below subtracts large terms, float32 would keep ~4 digits
        self.register_buffer("background_mean", buffer(background_mean, torch.float64))  # [D]
        self.register_buffer("precision", buffer(precision, torch.float64))  # [D, D]
        self.register_buffer("background_precision", buffer(background_precision, torch.float64))  # [D, D]
        self.register_buffer("precision_means_t", buffer((means @ precision).T, torch.float64))  # [D, C]: P mu_c
        self.register_buffer("means_norms", buffer(np.einsum("cd,cd->c", means @ precision, means), torch.float64))

    @classmethod
    def fit(cls, data, fitted):
        features = np.asarray(data.features, np.float64)
        classes = np.arange(data.num_classes)
        missing = [int(c) for c in classes if not np.any(data.labels == c)]
        if missing:
            raise ValueError(f"{cls.name}: no training features for class(es) {missing}")
        means = np.stack([features[data.labels == c].mean(axis=0) for c in classes])
        within = EmpiricalCovariance(assume_centered=True).fit(features - means[data.labels])
        background = EmpiricalCovariance().fit(features)
        return cls(means, within.precision_, background.location_, background.precision_)

    def forward(self, logits, features, computed):
        x = features.double() - self.background_mean
        # (x - mu_c)^T P (x - mu_c) = x^T P x - 2 x^T P mu_c + mu_c^T P mu_c: one [B, D] x [D, C] product
        x_p = x @ self.precision
        to_classes = (x_p * x).sum(dim=1, keepdim=True) - 2.0 * (x @ self.precision_means_t) + self.means_norms
        to_background = ((x @ self.background_precision) * x).sum(dim=1)
        return (to_classes.amin(dim=1) - to_background).float()

    def metadata(self):
        return {"means": "class means of training features", "covariance": "shared within-class, empirical",
                "background": "one Gaussian over all training features", "num_classes": int(self.means_norms.shape[0])}
