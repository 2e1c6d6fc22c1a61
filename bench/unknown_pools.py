#!/usr/bin/env python
"""A second unknown pool for the open-set benchmark (``--unknown-data``), built so that nothing in it was seen
while the strategies were developed on the default pool (MNIST train digits 6-9 + Fashion-MNIST train).

14 classes, written as an ``.npz`` (``images`` uint8 [N, 28, 28], ``labels``, ``class_names``):

- ``bold-6`` … ``bold-9``: MNIST **test** digits 6-9 with strokes thickened by a 3x3 maximum filter — more ink
  than any training digit, so larger activations and higher top logits (what broke the MAV-based strategies
  on the maintainers' unseen pool), and the t10k split, which the default pool does not draw from;
- ten drawn shapes, ``ring``, ``square``, ``triangle``, ``plus``, ``cross``, ``grating``, ``zigzag``, ``disc``,
  ``star``, ``scribble`` (a random walk): random centre, size, rotation and stroke width (2-4 px at 28x28),
  drawn at 4x and downsampled with a Lanczos filter, so their edges are anti-aliased like MNIST's.

Deterministic given ``--seed``. ``python bench/unknown_pools.py OUT.npz [--per-shape 900]``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("ring", "square", "triangle", "plus", "cross", "grating", "zigzag", "disc", "star", "scribble")
BOLD = (6, 7, 8, 9)
SCALE = 4  # drawn at 112x112, downsampled to 28x28


def bold_digits(images: np.ndarray) -> np.ndarray:
    """Each image's 3x3 maximum filter (strokes about 2 px thicker)."""
    padded = np.pad(images, ((0, 0), (1, 1), (1, 1)))
    h, w = images.shape[1:]
    return np.max([padded[:, dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)], axis=0)


def _polygon(cx, cy, r, corners, angle):
    t = angle + 2 * np.pi * np.arange(corners) / corners
    return [(float(cx + r * np.cos(a)), float(cy + r * np.sin(a))) for a in t]


def draw_shape(kind: str, rng: np.random.Generator) -> np.ndarray:
    size = 28 * SCALE
    image = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(image)
    cx, cy = rng.uniform(0.4, 0.6, 2) * size
    r = rng.uniform(0.22, 0.36) * size
    width = int(rng.uniform(2, 4) * SCALE)
    angle = rng.uniform(0, 2 * np.pi)
    if kind == "ring":
        rx, ry = r, r * rng.uniform(0.6, 1.0)
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], outline=255, width=width)
    elif kind == "disc":
        draw.ellipse([cx - r * 0.7, cy - r * 0.7, cx + r * 0.7, cy + r * 0.7], fill=255)
    elif kind in ("square", "triangle"):
        points = _polygon(cx, cy, r, 4 if kind == "square" else 3, angle)
        draw.line(points + points[:1], fill=255, width=width, joint="curve")
    elif kind in ("plus", "cross"):
        base = angle if kind == "cross" else rng.uniform(-0.15, 0.15)
        for a in (base, base + np.pi / 2):
            dx, dy = r * np.cos(a), r * np.sin(a)
            draw.line([(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=255, width=width)
    elif kind == "grating":
        for offset in np.linspace(-r, r, int(rng.integers(3, 5))):
            draw.line([(cx - r, cy + offset), (cx + r, cy + offset)], fill=255, width=width)
    elif kind == "zigzag":
        xs = np.linspace(cx - r, cx + r, int(rng.integers(4, 7)))
        ys = cy + np.where(np.arange(len(xs)) % 2, r * 0.6, -r * 0.6)
        draw.line(list(zip(xs.tolist(), ys.tolist())), fill=255, width=width, joint="curve")
    elif kind == "star":
        outer = _polygon(cx, cy, r, 5, angle)
        star = [outer[(2 * i) % 5] for i in range(5)]
        draw.line(star + star[:1], fill=255, width=width, joint="curve")
    elif kind == "scribble":
        steps = rng.normal(0, r * 0.35, (12, 2)).cumsum(axis=0)
        points = np.clip(steps - steps.mean(axis=0) + [cx, cy], width, size - width)
        draw.line([tuple(p) for p in points.tolist()], fill=255, width=width, joint="curve")
    else:
        raise ValueError(f"unknown shape {kind!r}")
    return np.asarray(image.resize((28, 28), Image.LANCZOS), dtype=np.uint8)


def build(mnist_test: tuple[np.ndarray, np.ndarray], per_shape: int, seed: int):
    """(images, labels, class_names) of the pool (see the module docstring)."""
    rng = np.random.default_rng(seed)
    images, labels = mnist_test
    parts, targets = [], []
    for j, digit in enumerate(BOLD):
        parts.append(bold_digits(images[labels == digit]))
        targets.append(np.full(len(parts[-1]), j))
    for j, kind in enumerate(SHAPES):
        parts.append(np.stack([draw_shape(kind, rng) for _ in range(per_shape)]))
        targets.append(np.full(per_shape, len(BOLD) + j))
    names = tuple(f"bold-{d}" for d in BOLD) + SHAPES
    return np.concatenate(parts), np.concatenate(targets).astype(np.int64), names


def main(argv=None) -> Path:
    from oodguard.datasets import data_root, load_dataset

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help=".npz to write")
    p.add_argument("--data", type=Path, default=data_root(), help="folder with mnist/ (default: $OODGUARD_DATA, else ../shared/data)")
    p.add_argument("--per-shape", type=int, default=900)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    test = load_dataset(args.data / "mnist" / "t10k-images-idx3-ubyte.gz")
    images, labels, names = build((test.images, test.labels), args.per_shape, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, images=images, labels=labels, class_names=np.asarray(names))
    print(f"wrote {args.out}: {len(images)} images, {len(names)} classes ({', '.join(names)})")
    return args.out


if __name__ == "__main__":
    main()
