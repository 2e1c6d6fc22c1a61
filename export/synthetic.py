"""Synthetic validation OOD made from in-distribution training images, for tuning (never for testing).

Three corruptions, a third each, applied to model inputs ``[N, C, H, W]``: pixel permutation within an
image (keeps the intensity histogram, destroys all structure: group ``far``), a 4x4 jigsaw of patches
(keeps local strokes, destroys the layout: ``near``), and a 50/50 blend of two images of different
classes (plausible strokes of two classes at once: ``near``). None of them is a noise or blob image, so
the far-OOD test sets of the benchmarks stay unseen. Groups: :mod:`oodguard.export.validation`.
"""

from __future__ import annotations

import numpy as np

from .validation import FAR, NEAR, ValidationOOD


def pixel_permutation(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    n, c, h, w = images.shape
    flat = images.reshape(n, c, h * w).copy()
    for item in flat:
        item[:] = item[:, rng.permutation(h * w)]
    return flat.reshape(n, c, h, w)


def jigsaw(images: np.ndarray, rng: np.random.Generator, grid: int = 4) -> np.ndarray:
    n, c, h, w = images.shape
    ph, pw = h // grid, w // grid
    out = images.copy()
    cells = [(i * ph, j * pw) for i in range(grid) for j in range(grid)]
    for k in range(n):
        order = rng.permutation(len(cells))
        for (y, x), src in zip(cells, order):
            sy, sx = cells[src]
            out[k, :, y : y + ph, x : x + pw] = images[k, :, sy : sy + ph, sx : sx + pw]
    return out


def class_blend(images: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    partners = rng.permutation(len(images))
    clash = labels[partners] == labels
    for _ in range(10):  # re-draw partners of the same class
        if not clash.any():
            break
        partners[clash] = rng.choice(len(images), size=int(clash.sum()))
        clash = labels[partners] == labels
    return 0.5 * images + 0.5 * images[partners]


def validation_ood(images: np.ndarray, labels: np.ndarray, size: int, seed: int) -> ValidationOOD:
    """``size`` corrupted copies of randomly drawn ``images`` (float32, same shape per item), grouped."""
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(images), size=min(size, len(images)), replace=False)
    parts = np.array_split(picks, 3)
    corrupted = [pixel_permutation(images[parts[0]], rng), jigsaw(images[parts[1]], rng),
                 class_blend(images[parts[2]], labels[parts[2]], rng)]
    groups = np.array([FAR] * len(parts[0]) + [NEAR] * (len(parts[1]) + len(parts[2])), dtype=object)
    return ValidationOOD(np.concatenate(corrupted).astype(np.float32), groups)
