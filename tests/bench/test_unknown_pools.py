"""bench/unknown_pools.py: the second unknown pool of the open-set benchmark (bold test digits + drawn shapes)."""

import numpy as np

from bench_scripts import load_bench


def load():
    return load_bench("unknown_pools")


def test_fourteen_classes_deterministic_with_thicker_digits_and_drawn_shapes():
    pools = load()
    digits = np.zeros((40, 28, 28), np.uint8)
    digits[:, 8:20, 13:15] = 255  # a 2-px vertical stroke
    labels = np.repeat([6, 7, 8, 9], 10)
    images, targets, names = pools.build((digits, labels), per_shape=5, seed=3)
    again, _, _ = pools.build((digits, labels), per_shape=5, seed=3)
    assert images.shape == (40 + 50, 28, 28) and images.dtype == np.uint8 and np.array_equal(images, again)
    assert names[:4] == ("bold-6", "bold-7", "bold-8", "bold-9") and len(names) == 14 == len(set(names))
    assert np.bincount(targets).tolist() == [10] * 4 + [5] * 10
    assert ((images[:40] > 0).sum(axis=(1, 2)) == 14 * 4).all()  # 12x2 stroke grown to 14x4 by the 3x3 maximum
    for c in range(4, 14):  # every drawn shape: a stroke (1-60% of the pixels bright), anti-aliased (grey edges)
        shape = images[targets == c]
        ink = (shape > 128).mean(axis=(1, 2))
        assert ((ink > 0.01) & (ink < 0.6)).all() and ((shape > 0) & (shape < 128)).any()
    assert not np.array_equal(pools.build((digits, labels), 5, seed=4)[0][40:], images[40:])
