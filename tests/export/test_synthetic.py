import numpy as np

from oodguard.export.synthetic import class_blend, jigsaw, pixel_permutation, validation_ood


def _images(n=6, seed=0):
    return np.random.default_rng(seed).normal(size=(n, 1, 8, 8)).astype(np.float32)


def test_pixel_permutation_keeps_each_images_values():
    images = _images()
    out = pixel_permutation(images, np.random.default_rng(0))
    assert out.shape == images.shape and not np.allclose(out, images)
    for a, b in zip(images, out):
        np.testing.assert_array_equal(np.sort(a.ravel()), np.sort(b.ravel()))


def test_jigsaw_moves_whole_patches():
    images = _images()
    out = jigsaw(images, np.random.default_rng(0), grid=4)
    patches = lambda x: sorted(x[0, y:y + 2, z:z + 2].tobytes() for y in range(0, 8, 2) for z in range(0, 8, 2))
    for a, b in zip(images, out):
        assert patches(a) == patches(b)
    assert not np.allclose(out, images)


def test_class_blend_mixes_images_of_different_classes():
    images = _images(40)
    labels = np.repeat([0, 1, 2, 3], 10)
    out = class_blend(images, labels, np.random.default_rng(0))
    for i in range(len(images)):
        partner = 2 * out[i] - images[i]
        match = [j for j in range(len(images)) if np.allclose(images[j], partner, atol=1e-5)]
        assert match and labels[match[0]] != labels[i]


def test_validation_ood_size_dtype_and_seed():
    images, labels = _images(30), np.repeat([0, 1, 2], 10)
    out = validation_ood(images, labels, size=12, seed=3)
    assert out.images.shape == (12, 1, 8, 8) and out.images.dtype == np.float32
    np.testing.assert_array_equal(out.images, validation_ood(images, labels, size=12, seed=3).images)
    assert list(out.groups) == ["far"] * 4 + ["near"] * 8  # permutations, then jigsaws and blends
