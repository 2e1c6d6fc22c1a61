"""Preprocessing: uint8 images to float32 [N,C,H,W] by channel conversion, resize and normalisation."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from oodguard.preprocess import STEP_ORDER, Preprocessing

GRAY_28 = Preprocessing(channels=1, height=28, width=28, mean=(0.5,), std=(0.25,))
RGB_4 = Preprocessing(channels=3, height=4, width=4, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
GRAY_4 = Preprocessing(channels=1, height=4, width=4, mean=(0.0,), std=(1.0,))


def random_images(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def test_output_is_float32_nchw():
    out = GRAY_28.apply(random_images((5, 28, 28)))
    assert out.shape == (5, 1, 28, 28) and out.dtype == np.float32 and out.flags.c_contiguous
    out = RGB_4.apply(random_images((2, 4, 4, 3)))
    assert out.shape == (2, 3, 4, 4) and out.dtype == np.float32


def test_normalisation_numbers():
    images = np.stack([np.full((28, 28), 255, np.uint8), np.zeros((28, 28), np.uint8), np.full((28, 28), 51, np.uint8)])
    out = GRAY_28.apply(images)
    np.testing.assert_allclose(out[0], 2.0)  # (1 - 0.5) / 0.25
    np.testing.assert_allclose(out[1], -2.0)  # (0 - 0.5) / 0.25
    np.testing.assert_allclose(out[2], -1.2, rtol=1e-6)  # (0.2 - 0.5) / 0.25


def test_per_channel_mean_and_std():
    prep = Preprocessing(3, 2, 2, mean=(0.0, 0.5, 1.0), std=(1.0, 0.5, 2.0))
    out = prep.apply(np.full((1, 2, 2, 3), 255, np.uint8))
    assert out[0, :, 0, 0].tolist() == [1.0, 1.0, 0.0]


def test_grayscale_to_rgb_repeats_the_channel():
    images = random_images((3, 4, 4))
    out = RGB_4.apply(images)
    for c in range(3):
        np.testing.assert_array_equal(out[:, c], images.astype(np.float32) / 255.0)
    assert RGB_4.conversion_steps((4, 4)) == ["grayscale -> RGB (repeat)"]


def test_rgb_to_grayscale_is_pil_luma():
    images = random_images((3, 4, 4, 3), seed=1)
    out = GRAY_4.apply(images)
    expected = np.stack([np.asarray(Image.fromarray(im).convert("L")) for im in images]).astype(np.float32) / 255.0
    np.testing.assert_array_equal(out[:, 0], expected)
    luma = images.astype(np.float64) @ np.array([0.299, 0.587, 0.114])  # ITU-R 601-2
    assert np.max(np.abs(out[:, 0] * 255.0 - luma)) <= 1.0
    assert GRAY_4.conversion_steps((4, 4, 3)) == ["RGB -> grayscale (luma)"]


def test_resize_is_bilinear_and_reported():
    images = random_images((2, 8, 8), seed=2)
    out = GRAY_28.apply(images)
    assert out.shape == (2, 1, 28, 28)
    expected = np.asarray(Image.fromarray(images[1]).resize((28, 28), Image.Resampling.BILINEAR)).astype(np.float32)
    np.testing.assert_allclose(out[1, 0], (expected / 255.0 - 0.5) / 0.25, rtol=1e-6)
    np.testing.assert_allclose(GRAY_28.apply(np.full((1, 8, 8), 255, np.uint8)), 2.0)  # constant stays constant
    assert GRAY_28.conversion_steps((8, 8)) == ["resize 8x8 -> 28x28 (bilinear)"]


def test_both_steps_reported_in_order():
    assert RGB_4.conversion_steps((8, 6)) == ["grayscale -> RGB (repeat)", "resize 8x6 -> 4x4 (bilinear)"]


def test_no_steps_when_shapes_match():
    assert GRAY_28.conversion_steps((28, 28)) == []
    assert GRAY_28.conversion_steps((28, 28, 1)) == []
    assert RGB_4.conversion_steps((4, 4, 3)) == []


def test_trailing_single_channel_is_accepted():
    images = random_images((2, 28, 28), seed=3)
    np.testing.assert_array_equal(GRAY_28.apply(images[..., None]), GRAY_28.apply(images))


def test_empty_batch():
    assert GRAY_28.apply(np.zeros((0, 28, 28), np.uint8)).shape == (0, 1, 28, 28)


def test_dict_roundtrip_through_json():
    prep = Preprocessing(3, 32, 24, mean=(0.4914, 0.4822, 0.4465), std=(0.247, 0.2435, 0.2616))
    raw = json.loads(json.dumps(prep.to_dict()))
    assert raw["order"] == STEP_ORDER and raw["mean"] == [0.4914, 0.4822, 0.4465]
    assert Preprocessing.from_dict(raw) == prep
    assert Preprocessing.from_dict(raw).input_shape == (3, 32, 24)


@pytest.mark.parametrize(
    "images, message",
    [
        (np.zeros((1, 28, 28), np.float32), "must be uint8"),
        (np.zeros((28, 28), np.uint8), r"\[N,H,W\]"),
        (np.zeros((1, 1, 28, 28, 1), np.uint8), r"\[N,H,W\]"),
        (np.zeros((1, 28, 28, 2), np.uint8), r"\[N,H,W\]"),
    ],
    ids=["float", "2-D", "5-D", "two-channels"],
)
def test_bad_images_raise(images, message):
    with pytest.raises(ValueError, match=message):
        GRAY_28.apply(images)


@pytest.mark.parametrize(
    "args, message",
    [
        ((2, 28, 28, (0.5, 0.5), (1.0, 1.0)), "channels must be 1 or 3"),
        ((1, 0, 28, (0.5,), (1.0,)), "positive"),
        ((1, 28, 28, (0.5,), (0.0,)), "std > 0"),
        ((1, 28, 28, (0.5,), (-1.0,)), "std > 0"),
        ((3, 28, 28, (0.5,), (1.0,)), "one value per channel"),
        ((1, 28, 28, (0.5,), (1.0, 1.0)), "one value per channel"),
    ],
)
def test_bad_settings_raise(args, message):
    with pytest.raises(ValueError, match=message):
        Preprocessing(*args)


@pytest.mark.parametrize("channels", [1, 3])
def test_invert_undoes_normalisation_to_the_pixel(channels):
    rng = np.random.default_rng(0)
    shape = (2, 12, 12) if channels == 1 else (2, 12, 12, 3)
    images = rng.integers(0, 256, size=shape, dtype=np.uint8)
    prep = Preprocessing(channels, 12, 12, (0.3,) * channels, (0.2,) * channels)
    x = prep.apply(images)
    for image, model_input in zip(images, x):
        back = prep.invert(model_input)
        assert back.dtype == np.uint8 and back.shape == image.shape
        assert np.abs(back.astype(int) - image.astype(int)).max() <= 1
