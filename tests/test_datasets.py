"""Dataset readers (IDX, .npz, image folders, digits), class selection and stratified splits."""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from oodguard.datasets import (Dataset, DatasetError, decode_image, load_dataset, natural_key, read_idx,
                               stratified_split)

IDX_TYPE_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(">i2"): 0x0B, np.dtype(">f4"): 0x0D}


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX encoding of ``array``: two zero bytes, type code, ndim, big-endian dims, big-endian data."""
    header = bytes([0, 0, IDX_TYPE_CODES[array.dtype], array.ndim])
    header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.tobytes()


def write_idx(path: Path, array: np.ndarray) -> Path:
    data = idx_bytes(array)
    if path.suffix == ".gz":
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def sample_images(n: int = 5, height: int = 3, width: int = 4) -> np.ndarray:
    return (np.arange(n * height * width) * 7 % 256).astype(np.uint8).reshape(n, height, width)


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def save_image(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


# --- IDX ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_pair_reads_images_and_sibling_labels(tmp_path, suffix):
    images = sample_images()
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    image_path = write_idx(tmp_path / f"train-images-idx3-ubyte{suffix}", images)
    write_idx(tmp_path / f"train-labels-idx1-ubyte{suffix}", labels)

    data = load_dataset(image_path)

    assert data.images.shape == (5, 3, 4) and data.images.dtype == np.uint8
    np.testing.assert_array_equal(data.images, images)
    assert data.labels.dtype == np.int64
    assert data.labels.tolist() == [3, 1, 4, 1, 5]
    assert data.class_names is None and data.source == str(image_path)


def test_idx_without_label_file_has_no_labels(tmp_path):
    data = load_dataset(write_idx(tmp_path / "t10k-images-idx3-ubyte", sample_images()))
    assert data.labels is None and len(data) == 5


def test_read_idx_parses_declared_type_and_shape(tmp_path):
    values = np.array([[-300, 2], [7, 32000], [-1, 0]], dtype=">i2")
    out = read_idx(write_idx(tmp_path / "values-idx2-short", values))
    assert out.shape == (3, 2) and out.dtype == np.dtype(">i2")
    assert out.tolist() == [[-300, 2], [7, 32000], [-1, 0]]

    floats = np.array([0.25, -1.5, 3.0], dtype=">f4")
    assert read_idx(write_idx(tmp_path / "floats-idx1-float.gz", floats)).tolist() == [0.25, -1.5, 3.0]


def test_idx_images_of_another_type_are_refused_not_wrapped(tmp_path):
    path = write_idx(tmp_path / "wide-images-idx3-ubyte", np.full((2, 2, 2), 300, dtype=">i2"))
    with pytest.raises(DatasetError, match="uint8"):
        load_dataset(path)


def test_idx_bad_magic_is_an_error(tmp_path):
    data = bytearray(idx_bytes(sample_images()))
    data[2] = 0x42  # no such type code
    path = tmp_path / "bad-images-idx3-ubyte"
    path.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match="bad magic"):
        read_idx(path)
    path.write_bytes(b"\x01\x00" + bytes(data[2:]))
    with pytest.raises(DatasetError, match="bad magic"):
        read_idx(path)


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_truncated_data_is_an_error(tmp_path, suffix):
    data = idx_bytes(sample_images())[:-5]
    path = tmp_path / f"short-images-idx3-ubyte{suffix}"
    path.write_bytes(gzip.compress(data) if suffix else data)
    with pytest.raises(DatasetError, match=r"shape \(5, 3, 4\) but the file holds 55 data bytes"):
        read_idx(path)


def test_idx_truncated_gzip_stream_is_an_error(tmp_path):
    path = tmp_path / "cut-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(idx_bytes(sample_images()))[:-12])
    with pytest.raises(DatasetError, match="cannot read IDX"):
        read_idx(path)


def test_idx_images_must_be_three_dimensional(tmp_path):
    path = write_idx(tmp_path / "flat-images-idx3-ubyte", np.zeros((4, 6), np.uint8))
    with pytest.raises(DatasetError, match="3-D"):
        load_dataset(path)


def test_real_mnist_test_set(shared_data):
    data = load_dataset(shared_data / "mnist" / "t10k-images-idx3-ubyte.gz")
    assert data.images.shape == (10000, 28, 28) and data.images.dtype == np.uint8
    assert data.labels.tolist()[:5] == [7, 2, 1, 0, 4]
    assert np.bincount(data.labels).sum() == 10000 and data.labels.max() == 9


# --- .npz --------------------------------------------------------------------------------------------


def test_npz_images_labels_and_class_names(tmp_path):
    images = sample_images(4)
    path = tmp_path / "set.npz"
    np.savez(path, images=images, labels=np.array([0, 1, 1, 0]), class_names=np.array(["a", "b"]))
    data = load_dataset(path)
    np.testing.assert_array_equal(data.images, images)
    assert data.labels.tolist() == [0, 1, 1, 0] and data.labels.dtype == np.int64
    assert data.class_names == ["a", "b"]
    assert data.source == f"{path}#images"


def test_npz_key_selection_drops_labels_of_another_length(tmp_path):
    path = tmp_path / "set.npz"
    np.savez(path, images=sample_images(4), other=sample_images(2, 5, 5), labels=np.arange(4))
    data = load_dataset(f"{path}#other")
    assert data.images.shape == (2, 5, 5) and data.labels is None
    assert data.source == f"{path}#other"


def test_npz_float_images_in_unit_range_are_scaled_to_uint8(tmp_path):
    path = tmp_path / "floats.npz"
    np.savez(path, images=np.array([[[0.0, 0.5], [1.0, 0.2]]], dtype=np.float32))
    data = load_dataset(path)
    assert data.images.dtype == np.uint8
    assert data.images.tolist() == [[[0, 128], [255, 51]]]


@pytest.mark.parametrize(
    "images",
    [np.full((1, 2, 2), 2.0), np.arange(4, dtype=np.int64).reshape(1, 2, 2), np.array([[[np.nan, 0.5]]])],
    ids=["float-above-1", "int64", "nan"],
)
def test_npz_wrong_dtype_is_an_error(tmp_path, images):
    path = tmp_path / "bad.npz"
    np.savez(path, images=images)
    with pytest.raises(DatasetError, match="must be uint8"):
        load_dataset(path)


def test_npz_string_labels_are_class_names_in_natural_order(tmp_path):
    """A labels array of class-name strings (not indices) is read by name: the classes are the distinct names,
    digits by number ('9' before '10'), and each label is its name's index."""
    path = tmp_path / "named.npz"
    np.savez(path, images=sample_images(5), labels=np.array(["cat", "10", "9", "cat", "9"]))
    data = load_dataset(path)
    assert data.class_names == ["9", "10", "cat"]
    assert data.labels.tolist() == [2, 1, 0, 2, 0] and data.labels.dtype == np.int64


def test_npz_string_labels_index_its_class_names(tmp_path):
    path = tmp_path / "named.npz"
    np.savez(path, images=sample_images(3), labels=np.array(["dog", "ant", "dog"]),
             class_names=np.array(["dog", "cat", "ant"]))
    data = load_dataset(path)
    assert data.class_names == ["dog", "cat", "ant"] and data.labels.tolist() == [0, 2, 0]
    np.savez(path, images=sample_images(3), labels=np.array(["dog", "emu", "dog"]), class_names=np.array(["dog"]))
    with pytest.raises(DatasetError, match=r"label\(s\) \['emu'\] are not in its class_names \['dog'\]"):
        load_dataset(path)


@pytest.mark.parametrize("labels, message", [
    (np.array([0.0, 1.5, 1.0]), "neither class indices nor class names; an .npz dataset holds 'images'"),
    (np.array([[0], [1], [1]]), r"'labels' must be 1-D .* got shape \(3, 1\)"),
    (np.array([0, 2, 1]), r"label 2 has no name: class_names holds 2 \(\['a', 'b'\]\)"),
], ids=["fractional", "2-d", "beyond-class-names"])
def test_npz_labels_that_are_neither_indices_nor_names_are_explained(tmp_path, labels, message):
    path = tmp_path / "bad.npz"
    np.savez(path, images=sample_images(3), labels=labels, class_names=np.array(["a", "b"]))
    with pytest.raises(DatasetError, match=message):
        load_dataset(path)


def test_npz_whole_number_float_labels_are_indices(tmp_path):
    path = tmp_path / "floats.npz"
    np.savez(path, images=sample_images(3), labels=np.array([2.0, 0.0, 1.0]))
    assert load_dataset(path).labels.tolist() == [2, 0, 1]


def test_npz_object_labels_say_how_to_save_them(tmp_path):
    """Python strings saved as an object array need pickle, which datasets never load: the error says to save
    them with dtype=str (and the layout), not numpy's bare 'Object arrays cannot be loaded'."""
    path = tmp_path / "objects.npz"
    np.savez(path, images=sample_images(2), labels=np.array(["a", 1], dtype=object))
    with pytest.raises(DatasetError, match=r"save strings as np.asarray\(names, dtype=str\)\. an .npz dataset holds"):
        load_dataset(path)


def test_natural_key_orders_digit_runs_by_number():
    names = ["9", "class10", "8", "10", "Cat", "class2", "ant"]
    assert sorted(names, key=natural_key) == ["8", "9", "10", "ant", "Cat", "class2", "class10"]


def test_npz_missing_key_lists_the_arrays(tmp_path):
    path = tmp_path / "set.npz"
    np.savez(path, x_test=sample_images(2), y_test=np.arange(2))
    with pytest.raises(DatasetError, match=r"no array 'images' \(arrays: \['x_test', 'y_test'\]\)"):
        load_dataset(path)
    with pytest.raises(DatasetError, match="no array 'x'"):
        load_dataset(f"{path}#x")


# --- folders of images -------------------------------------------------------------------------------


def test_folder_with_class_subfolders_gives_labels_and_names(tmp_path):
    cat, dog = np.full((4, 5), 10, np.uint8), np.full((4, 5), 200, np.uint8)
    save_image(tmp_path / "cat" / "a.png", cat)
    save_image(tmp_path / "cat" / "b.PNG", cat)
    save_image(tmp_path / "dog" / "nested" / "c.png", dog)
    (tmp_path / "dog" / "notes.txt").write_text("not an image")

    data = load_dataset(tmp_path)

    assert data.class_names == ["cat", "dog"]
    assert data.labels.tolist() == [0, 0, 1]
    assert data.images.shape == (3, 4, 5)
    assert data.images[:, 0, 0].tolist() == [10, 10, 200]


def test_flat_folder_has_no_labels_and_keeps_rgb(tmp_path):
    rgb = np.zeros((6, 6, 3), np.uint8)
    rgb[..., 0] = 255
    save_image(tmp_path / "x.png", rgb)
    save_image(tmp_path / "y.jpg", rgb)
    data = load_dataset(tmp_path)
    assert data.labels is None and data.class_names is None
    assert data.images.shape == (2, 6, 6, 3)
    np.testing.assert_array_equal(data.images[0], rgb)  # PNG is lossless
    assert abs(int(data.images[1, 3, 3, 0]) - 255) <= 3 and data.images[1, 3, 3, 1] <= 3  # JPEG nearly so


def test_empty_folder_is_an_error_that_states_the_layout(tmp_path):
    (tmp_path / "readme.txt").write_text("no images")
    with pytest.raises(DatasetError) as info:
        load_dataset(tmp_path)
    message = str(info.value)
    assert message.startswith(f"{tmp_path}: no PNG/JPEG images found; a folder dataset holds one subfolder per class "
                              "of PNG/JPEG images") and "give that file's path" not in message and "\n" not in message


def test_a_folder_of_idx_or_npz_files_names_the_file_to_give_instead(tmp_path):
    """The MNIST folder itself given as a dataset: the error names its IDX images files (not the labels files),
    which are datasets by their own path; an .npz in a subfolder is named too."""
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", sample_images(2))
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.arange(2, dtype=np.uint8))
    write_idx(tmp_path / "t10k-images-idx3-ubyte", sample_images(2))
    with pytest.raises(DatasetError) as info:
        load_dataset(tmp_path)
    assert str(info.value) == (
        f"{tmp_path}: no PNG/JPEG images found; a folder dataset holds one subfolder per class of PNG/JPEG images "
        "(the subfolder names are the class names), or PNG/JPEG images directly (unlabeled). This folder holds IDX "
        f"file(s); give that file's path as the dataset instead: {tmp_path / 't10k-images-idx3-ubyte'}, "
        f"{tmp_path / 'train-images-idx3-ubyte.gz'}")
    assert len(load_dataset(tmp_path / "train-images-idx3-ubyte.gz")) == 2  # the file named does load
    (tmp_path / "harvest").mkdir()
    np.savez(tmp_path / "harvest" / "data.npz", images=sample_images(2))
    with pytest.raises(DatasetError, match=rf"holds IDX and .npz file\(s\); .*: {tmp_path / 'harvest' / 'data.npz'}, "):
        load_dataset(tmp_path)


def test_folder_of_mixed_sizes_is_an_error(tmp_path):
    save_image(tmp_path / "a.png", np.zeros((4, 4), np.uint8))
    save_image(tmp_path / "b.png", np.zeros((5, 4), np.uint8))
    with pytest.raises(DatasetError, match="different shapes"):
        load_dataset(tmp_path)


def test_folder_with_corrupt_file_names_it(tmp_path):
    save_image(tmp_path / "good.png", np.zeros((4, 4), np.uint8))
    (tmp_path / "broken.png").write_bytes(png_bytes(np.zeros((4, 4), np.uint8))[:20])
    with pytest.raises(DatasetError, match="broken.png: cannot decode"):
        load_dataset(tmp_path)


def test_decode_image_modes():
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
    np.testing.assert_array_equal(decode_image(png_bytes(gray)), gray)
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 1] = 90
    assert decode_image(png_bytes(rgba)).shape == (2, 2, 3)
    assert decode_image(png_bytes(rgba))[..., 1].tolist() == [[90, 90], [90, 90]]


def test_unknown_and_missing_specs(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        load_dataset(tmp_path / "nope.npz")
    other = tmp_path / "data.csv"
    other.write_text("1,2")
    with pytest.raises(DatasetError, match="unknown dataset format"):
        load_dataset(other)


# --- digits, class selection ---------------------------------------------------------------------------


def test_digits():
    data = load_dataset("digits")
    assert data.images.shape == (1797, 8, 8) and data.images.dtype == np.uint8
    assert data.images.max() == 255 and data.images.min() == 0
    assert sorted(np.unique(data.labels).tolist()) == list(range(10))
    assert data.class_names == [str(i) for i in range(10)]
    assert data.labels[:5].tolist() == [0, 1, 2, 3, 4]


def labelled(labels: list[int], class_names: list[str] | None = None) -> Dataset:
    images = np.arange(len(labels), dtype=np.uint8)[:, None, None].repeat(2, 1).repeat(2, 2)
    return Dataset(images, np.array(labels, dtype=np.int64), class_names, "test")


def test_select_classes_relabels_in_the_order_given():
    data = labelled([5, 2, 9, 2, 5, 7], ["c0", "c1", "c2", "c3", "c4", "c5", "c6", "c7", "c8", "c9"])
    picked = data.select_classes([5, 2])
    assert picked.labels.tolist() == [0, 1, 1, 0]  # images 0, 1, 3, 4 keep their order
    assert picked.images[:, 0, 0].tolist() == [0, 1, 3, 4]
    assert picked.class_names == ["c5", "c2"]

    reversed_pick = data.select_classes([2, 5])
    assert reversed_pick.labels.tolist() == [1, 0, 0, 1]
    assert reversed_pick.class_names == ["c2", "c5"]


def test_select_classes_without_class_names_names_them_by_number():
    assert labelled([1, 3, 3]).select_classes([3]).class_names == ["3"]


def test_select_missing_class_is_an_error():
    with pytest.raises(DatasetError, match=r"class\(es\) \[4, 12\]; present: \[1, 3\]"):
        labelled([1, 3]).select_classes([1, 4, 12])


def test_select_classes_of_unlabelled_data_is_an_error():
    data = Dataset(np.zeros((2, 2, 2), np.uint8), None, None, "unlabelled")
    with pytest.raises(DatasetError, match="no labels"):
        data.select_classes([0])


# --- stratified split ----------------------------------------------------------------------------------

SPLIT_LABELS = np.repeat([0, 1, 2], [100, 40, 60])


def test_stratified_split_is_disjoint_complete_and_proportional():
    parts = stratified_split(SPLIT_LABELS, [0.7, 0.2, 0.1], seed=3)
    joined = np.concatenate(parts)
    assert len(joined) == len(np.unique(joined)) == len(SPLIT_LABELS)
    assert all(np.all(np.diff(p) > 0) for p in parts)  # sorted indices
    counts = [np.bincount(SPLIT_LABELS[p], minlength=3).tolist() for p in parts]
    assert counts == [[70, 28, 42], [20, 8, 12], [10, 4, 6]]


def test_stratified_split_rounds_per_class_boundaries():
    labels = np.repeat([0, 1], [10, 3])
    parts = stratified_split(labels, [0.5, 0.5], seed=0)
    assert [np.bincount(labels[p], minlength=2).tolist() for p in parts] == [[5, 2], [5, 1]]


def test_stratified_split_with_fractions_below_one_leaves_the_rest_out():
    parts = stratified_split(SPLIT_LABELS, [0.5, 0.25], seed=0)
    assert [len(p) for p in parts] == [100, 50]
    assert not set(parts[0]) & set(parts[1])


def test_stratified_split_is_seeded():
    first = stratified_split(SPLIT_LABELS, [0.5, 0.5], seed=11)
    again = stratified_split(SPLIT_LABELS, [0.5, 0.5], seed=11)
    other = stratified_split(SPLIT_LABELS, [0.5, 0.5], seed=12)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not np.array_equal(first[0], other[0])


@pytest.mark.parametrize("fractions", [[], [0.5, 0.0], [-0.1, 0.5], [0.8, 0.3], [float("nan"), 0.5]])
def test_stratified_split_rejects_bad_fractions(fractions):
    with pytest.raises(ValueError, match="fractions must be positive"):
        stratified_split(SPLIT_LABELS, fractions, seed=0)


def test_a_missing_mnist_file_says_how_to_get_it_and_the_data_root_follows_oodguard_data(tmp_path, monkeypatch):
    from oodguard.datasets import DATA_ENV, DatasetError, data_root, load_dataset

    with pytest.raises(DatasetError) as info:
        load_dataset(tmp_path / "mnist" / "train-images-idx3-ubyte.gz")
    message = str(info.value)
    assert "not found" in message and "mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz" in message
    assert "fashion_mnist/" in message and DATA_ENV in message and "'digits'" in message
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    assert data_root() == tmp_path
    monkeypatch.delenv(DATA_ENV)
    assert data_root().parts[-2:] == ("shared", "data")


def _png_header_only() -> bytes:
    import io

    from PIL import Image

    import numpy as np

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)).save(buffer, format="PNG")
    data = buffer.getvalue()
    return data[: len(data) // 2]  # the header and half the pixel data: truncated


PNG_HEADER_ONLY = _png_header_only()


def test_an_undecodable_image_names_its_file_not_a_memory_buffer(tmp_path):
    from oodguard.datasets import DatasetError, decode_image

    with pytest.raises(DatasetError) as info:
        decode_image(b"not an image at all", source=str(tmp_path / "broken.png"))
    assert str(info.value) == f"{tmp_path / 'broken.png'}: not a PNG or JPEG image (or a corrupt one)"
    with pytest.raises(DatasetError) as truncated:
        decode_image(PNG_HEADER_ONLY, source="cut.png")
    assert str(truncated.value).startswith("cut.png: ") and "BytesIO" not in str(truncated.value)
