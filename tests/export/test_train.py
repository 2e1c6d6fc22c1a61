"""Training loop, determinism, progress reporting, input validation and batched extraction."""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch

from oodguard.export.backbones import Classifier, lenet5
from oodguard.export.train import accuracy, extract, predict_logits, random_shift, train_classifier

N_PER_CLASS = 100
EPOCHS = 4


def _patterns() -> np.ndarray:
    """Three 28x28 templates: horizontal stripes, vertical stripes, a centred square."""
    horizontal = np.zeros((28, 28), np.float32)
    horizontal[::4] = 1.0
    vertical = horizontal.T.copy()
    square = np.zeros((28, 28), np.float32)
    square[9:19, 9:19] = 1.0
    return np.stack([horizontal, vertical, square])


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    """300 noisy images in 3 separable classes, shaped [N, 1, 28, 28] float32 with int64 labels."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), N_PER_CLASS).astype(np.int64)
    images = _patterns()[labels] + 0.5 * rng.standard_normal((labels.size, 28, 28)).astype(np.float32)
    return images[:, None].astype(np.float32), labels


def _fresh_model(init_seed: int = 0) -> Classifier:
    torch.manual_seed(init_seed)
    return Classifier(lenet5(), num_classes=3)


def test_learns_separable_problem(data: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = data
    model = _fresh_model()
    history = train_classifier(model, images, labels, epochs=EPOCHS, batch_size=32, lr=3e-3, progress=None)

    assert [h["epoch"] for h in history] == list(range(1, EPOCHS + 1))
    assert all(set(h) == {"epoch", "loss", "accuracy", "seconds"} for h in history)
    assert history[-1]["loss"] < history[0]["loss"]
    assert history[-1]["accuracy"] > 0.9
    assert not model.training
    # Eval-mode predictions agree with the training-time accuracy.
    assert (predict_logits(model, images).argmax(axis=1) == labels).mean() > 0.9


def test_validation_accuracy_per_epoch_and_accuracy_per_class(data: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = data
    model = _fresh_model()
    lines: list[str] = []
    history = train_classifier(model, images[::2], labels[::2], epochs=2, batch_size=32, lr=3e-3,
                               progress=lines.append, validation=(images[1::2], labels[1::2]))
    assert all(set(h) == {"epoch", "loss", "accuracy", "validation_accuracy", "seconds"} for h in history)
    assert all(re.search(r"val acc \d\.\d{4}", line) for line in lines) and not model.training
    predicted = predict_logits(model, images[1::2]).argmax(axis=1)
    assert history[-1]["validation_accuracy"] == pytest.approx(float(np.mean(predicted == labels[1::2])))
    report = accuracy(model, images[1::2], labels[1::2], ["h", "v", "square"])
    assert report["n"] == 150 and report["overall"] == pytest.approx(history[-1]["validation_accuracy"])
    for c, name in enumerate(["h", "v", "square"]):
        mask = labels[1::2] == c
        assert report["per_class"][name] == pytest.approx(float(np.mean(predicted[mask] == c)))
    # the number of images behind each class's accuracy: 50 of each of the 3 classes among the 150
    assert report["per_class_n"] == {"h": 50, "v": 50, "square": 50}
    uneven = accuracy(model, images[[0, 1, 2, 100, 200, 201]], labels[[0, 1, 2, 100, 200, 201]])
    assert uneven["per_class_n"] == {"0": 3, "1": 1, "2": 2} and uneven["n"] == 6
    # a class without samples is left out of both
    only_zero = accuracy(model, images[labels == 0], labels[labels == 0])
    assert set(only_zero["per_class"]) == {"0"} and only_zero["per_class_n"] == {"0": N_PER_CLASS}


def test_sample_weights_change_what_is_drawn(data: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = data
    # weight only on class 2: every batch holds class 2 alone, so the model learns to answer 2 for everything
    only_two = (labels == 2).astype(np.float64)
    model = _fresh_model()
    train_classifier(model, images, labels, epochs=2, batch_size=32, lr=3e-3, progress=None, sample_weights=only_two)
    assert (predict_logits(model, images).argmax(axis=1) == 2).mean() > 0.95
    with pytest.raises(ValueError, match="sample_weights must be"):
        train_classifier(_fresh_model(), images, labels, epochs=1, progress=None, sample_weights=np.zeros(len(labels)))


def test_same_seed_gives_identical_weights(data: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = data
    first, second = _fresh_model(), _fresh_model()
    h1 = train_classifier(first, images, labels, epochs=2, batch_size=64, seed=7, progress=None)
    h2 = train_classifier(second, images, labels, epochs=2, batch_size=64, seed=7, progress=None)

    assert [h["loss"] for h in h1] == [h["loss"] for h in h2]
    s1, s2 = first.state_dict(), second.state_dict()
    assert s1.keys() == s2.keys()
    for key in s1:
        assert torch.equal(s1[key], s2[key]), key


def test_different_seed_gives_different_weights(data: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = data
    first = _fresh_model()
    second = copy.deepcopy(first)
    train_classifier(first, images, labels, epochs=1, batch_size=64, seed=0, progress=None)
    train_classifier(second, images, labels, epochs=1, batch_size=64, seed=1, progress=None)
    assert not torch.equal(first.head.weight, second.head.weight)


def test_progress_one_line_per_epoch(data: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = data
    lines: list[str] = []
    history = train_classifier(_fresh_model(), images, labels, epochs=3, batch_size=100, progress=lines.append)

    assert len(lines) == 3
    pattern = re.compile(r"^epoch (\d)/3  loss (\d+\.\d{4})  acc (\d\.\d{4})  \d+\.\ds$")
    for i, (line, record) in enumerate(zip(lines, history), start=1):
        match = pattern.match(line)
        assert match, line
        assert int(match[1]) == i
        assert float(match[2]) == pytest.approx(record["loss"], abs=1e-4)
        assert float(match[3]) == pytest.approx(record["accuracy"], abs=1e-4)


def test_progress_intermediate_lines_for_long_epochs(data: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = data
    lines: list[str] = []
    # With a zero interval every batch but the last of each epoch is "long enough" to report.
    train_classifier(
        _fresh_model(), images, labels, epochs=2, batch_size=100, progress=lines.append, report_every_s=0.0
    )
    batch_lines = [line for line in lines if "batch" in line]
    assert [line.split("  ")[:2] for line in batch_lines] == [
        ["epoch 1/2", "batch 1/3"],
        ["epoch 1/2", "batch 2/3"],
        ["epoch 2/2", "batch 1/3"],
        ["epoch 2/2", "batch 2/3"],
    ]
    assert len(lines) == 6


class RecordingBar:
    """Stands in for oodguard.progress.bar: records the total, the updates and the descriptions it was given."""

    made: list["RecordingBar"] = []

    def __init__(self, total=None, desc="", unit="it", **options):
        self.total, self.unit, self.descriptions, self.updates, self.closed = total, unit, [desc], [], False
        RecordingBar.made.append(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.closed = True

    def set_description(self, desc, refresh=True):
        self.descriptions.append(desc)

    def set_postfix_str(self, text, refresh=True):
        self.postfix = text

    def update(self, n=1):
        self.updates.append(n)

    def external_write_mode(self):
        import contextlib

        return contextlib.nullcontext()


def test_a_bar_counts_every_batch_of_every_epoch_and_the_epoch_lines_stay(data, monkeypatch) -> None:
    """`oodguard train`'s bar: one over epochs x batches (300 images in batches of 100: 3 per epoch), named by
    the epoch it is in; the per-epoch lines still reach ``progress``."""
    import oodguard.export.train as train_module

    RecordingBar.made = []
    monkeypatch.setattr(train_module, "bar", RecordingBar)
    images, labels = data
    lines: list[str] = []
    train_classifier(_fresh_model(), images, labels, epochs=2, batch_size=100, progress=lines.append)
    (steps,) = RecordingBar.made
    assert (steps.total, steps.unit, steps.updates, steps.closed) == (6, "batch", [1] * 6, True)
    assert steps.descriptions == ["train", "epoch 1/2", "epoch 2/2"]
    assert re.fullmatch(r"loss \d+\.\d{4} acc \d\.\d{4}", steps.postfix)
    assert [line.split("  ")[0] for line in lines] == ["epoch 1/2", "epoch 2/2"]


@pytest.mark.parametrize("forced, shown", [("1", True), ("0", False)])
def test_the_bar_shows_on_stderr_only_when_enabled(data, capsys, monkeypatch, forced, shown) -> None:
    """With OODGUARD_PROGRESS=1 the real tqdm bar draws on stderr (the epoch and the batch count); with 0 (or
    off a terminal) stderr stays empty. The epoch lines go to ``progress`` (stdout here) either way."""
    monkeypatch.setenv("OODGUARD_PROGRESS", forced)
    images, labels = data
    train_classifier(_fresh_model(), images[:40], labels[:40], epochs=2, batch_size=20, progress=print)
    captured = capsys.readouterr()
    assert ("epoch 2/2" in captured.err and "/4 " in captured.err) == shown and (captured.err == "") != shown
    assert [line.split("  ")[0] for line in captured.out.splitlines()] == ["epoch 1/2", "epoch 2/2"]


def test_progress_none_is_silent(data: tuple[np.ndarray, np.ndarray], capsys: pytest.CaptureFixture[str]) -> None:
    images, labels = data
    train_classifier(_fresh_model(), images[:20], labels[:20], epochs=1, progress=None)
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize(
    ("mutate", "kwargs", "needle"),
    [
        (lambda x, y: (x, y), {"epochs": 0}, "epochs must be >= 1"),
        (lambda x, y: (x, y), {"epochs": 1, "batch_size": 0}, "batch_size must be >= 1"),
        (lambda x, y: (x, y), {"epochs": 1, "shift": -1}, "shift must be >= 0"),
        (lambda x, y: (x, y), {"epochs": 1, "shift": 28}, r"smaller than the image \(28x28\), got 28"),
        (lambda x, y: (x[:0], y[:0]), {"epochs": 1}, "empty"),
        (lambda x, y: (x[:, 0], y), {"epochs": 1}, r"\[N, C, H, W\]"),
        (lambda x, y: (x[:, :, :27], y), {"epochs": 1}, r"backbone expects \(1, 28, 28\)"),
        (lambda x, y: (x.astype(np.int64), y), {"epochs": 1}, "floating point"),
        (lambda x, y: (x, y[:-1]), {"epochs": 1}, "300 images but 299 labels"),
        (lambda x, y: (x, y.astype(np.float32)), {"epochs": 1}, "labels must be integers"),
        (lambda x, y: (x, y[:, None]), {"epochs": 1}, "1-d"),
        (lambda x, y: (x, np.where(y == 2, 3, y)), {"epochs": 1}, r"\[0, 2\].*got range \[0, 3\]"),
        (lambda x, y: (x, y - 1), {"epochs": 1}, r"got range \[-1, 1\]"),
    ],
)
def test_bad_inputs_raise(data: tuple[np.ndarray, np.ndarray], mutate, kwargs: dict, needle: str) -> None:
    images, labels = mutate(*data)
    model = _fresh_model()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=needle):
        train_classifier(model, images, labels, progress=None, **kwargs)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_extract_shapes_and_consistency(data: tuple[np.ndarray, np.ndarray]) -> None:
    images = data[0][:37]
    model = _fresh_model()
    model.train()  # extract must switch to eval mode itself
    features, logits = extract(model, images, batch_size=16)

    assert not model.training
    assert features.shape == (37, 84) and logits.shape == (37, 3)
    assert features.dtype == logits.dtype == np.float32
    with torch.no_grad():
        head = model.head(torch.from_numpy(features)).numpy()
    np.testing.assert_allclose(logits, head, rtol=1e-5, atol=1e-6)
    # Batching does not change the numbers, and predict_logits agrees with extract.
    np.testing.assert_allclose(predict_logits(model, images, batch_size=5), logits, rtol=1e-5, atol=1e-6)
    full_features, _ = extract(model, images)
    np.testing.assert_allclose(full_features, features, rtol=1e-5, atol=1e-6)


def test_extract_validates_images() -> None:
    with pytest.raises(ValueError, match=r"backbone expects \(1, 28, 28\)"):
        extract(_fresh_model(), np.zeros((2, 3, 32, 32), np.float32))


def test_random_shift_moves_each_image_by_its_own_offset_and_repeats_the_border() -> None:
    rng = np.random.default_rng(0)
    images = torch.as_tensor(rng.standard_normal((64, 2, 9, 11)), dtype=torch.float32)
    shifted = random_shift(images, 2, torch.Generator().manual_seed(5))
    assert shifted.shape == images.shape
    offsets = set()
    for original, moved in zip(images, shifted):
        # find the offset that explains the image: every pixel comes from (row - dy, col - dx), clamped
        match = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                 if torch.equal(moved, original[:, (torch.arange(9) - dy).clamp(0, 8)][:, :, (torch.arange(11) - dx).clamp(0, 10)])]
        assert len(match) == 1
        offsets.add(match[0])
    assert len(offsets) >= 15  # 25 possible offsets, 64 draws: each image draws its own
    # seeded: the same generator state gives the same shifts
    again = random_shift(images, 2, torch.Generator().manual_seed(5))
    assert torch.equal(shifted, again)


def test_shift_augmentation_changes_training_and_stays_deterministic(data: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = data
    plain, shifted, shifted_again = _fresh_model(), _fresh_model(), _fresh_model()
    train_classifier(plain, images, labels, epochs=1, batch_size=64, seed=3, progress=None)
    h1 = train_classifier(shifted, images, labels, epochs=1, batch_size=64, seed=3, progress=None, shift=2)
    h2 = train_classifier(shifted_again, images, labels, epochs=1, batch_size=64, seed=3, progress=None, shift=2)
    assert not torch.equal(plain.head.weight, shifted.head.weight)
    assert h1[0]["loss"] == h2[0]["loss"] and torch.equal(shifted.head.weight, shifted_again.head.weight)
