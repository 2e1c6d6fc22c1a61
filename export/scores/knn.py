"""Deep nearest neighbours (Sun et al. 2022): distance to the k-th nearest training feature.

Features are normalised to unit length; the bank holds the normalised features of the bank samples.
The score is the Euclidean distance ``sqrt(2 - 2 cos)`` to the k-th nearest bank feature (higher =
more OOD; OpenOOD reports its negative). ``k`` defaults to 50 (the paper's CIFAR-10 value) and is
clipped to the bank size.
"""

import numpy as np
import torch

from .base import Score, buffer


def normalise(features: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return features / np.maximum(norms, 1e-12)


class Knn(Score):
    name = "knn"

    def __init__(self, bank: np.ndarray, k: int):
        super().__init__()
        if not 1 <= k <= len(bank):
            raise ValueError(f"knn: k={k} must be between 1 and the bank size {len(bank)}")
        self.k = k
        self.register_buffer("bank_t", buffer(normalise(bank).T))  # [D, N]: see Sisom

    @classmethod
    def fit(cls, data, fitted, k: int = 50):
        return cls(data.features[data.bank], min(k, len(data.bank)))

    def forward(self, logits, features, computed):
        unit = features / torch.clamp(torch.linalg.vector_norm(features, dim=1, keepdim=True), min=1e-12)
        cos = unit @ self.bank_t
        kth = torch.topk(cos, self.k, dim=1).values[:, -1]
        return torch.sqrt(torch.clamp(2.0 - 2.0 * kth, min=0.0))

    def metadata(self):
        return {"k": self.k, "bank_size": int(self.bank_t.shape[1])}
