"""Cluster (class-centre cosine) distance (Sinhamahapatra et al. 2022): ``1 - max_c cos(h, mu_c)``.

``mu_c`` are the means of the training features of each class (all training samples, not only the
bank). The input is compared with its *nearest* centre, never with a true label (that would leak
labels when scoring in-distribution test data).
"""

import numpy as np
import torch

from .base import Score, buffer


class Cluster(Score):
    name = "cluster"

    def __init__(self, centres: np.ndarray):
        super().__init__()
        unit = centres / np.maximum(np.linalg.norm(centres, axis=1, keepdims=True), 1e-12)
        self.register_buffer("centres_t", buffer(unit.T))  # [D, C]: see Sisom

    @classmethod
    def fit(cls, data, fitted):
        classes = np.arange(data.num_classes)
        missing = [c for c in classes if not np.any(data.labels == c)]
        if missing:
            raise ValueError(f"cluster: no training features for class(es) {missing}")
        return cls(np.stack([data.features[data.labels == c].mean(axis=0) for c in classes]))

    def forward(self, logits, features, computed):
        unit = features / torch.clamp(torch.linalg.vector_norm(features, dim=1, keepdim=True), min=1e-12)
        return 1.0 - (unit @ self.centres_t).amax(dim=1)

    def metadata(self):
        return {"centres": "class means of training features", "num_centres": int(self.centres_t.shape[1])}
