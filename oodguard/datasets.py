"""Dataset readers: IDX (.gz or raw), .npz, folders of PNG/JPEG, and scikit-learn's bundled digits.

Every reader returns a :class:`Dataset` of uint8 images, ``[N, H, W]`` (grayscale) or ``[N, H, W, 3]``
(RGB), with optional integer labels. Conversion to a model's input is a separate, explicit step
(:mod:`oodguard.preprocess`). Imports NumPy and Pillow only, so the gateway can use it.

Dataset specs accepted by :func:`load_dataset`:

- ``digits``: scikit-learn's bundled 8x8 digits (values 0..16 scaled to 0..255).
- ``PATH-images-idx3-ubyte[.gz]``: IDX images; labels are read from the sibling ``*-labels-idx1-ubyte[.gz]``.
- ``PATH.npz`` or ``PATH.npz#KEY``: the ``images`` array (or ``KEY``), optional ``labels`` (integer indices, or
  class-name strings) and optional ``class_names`` (what ``oodguard labels import`` writes: integer labels
  indexing ``class_names``). String labels are names: with ``class_names`` each must be one of them, without it
  the classes are the distinct names in natural order (see :func:`natural_key`).
- ``DIR``: PNG/JPEG files; one subfolder per class gives labels and class names.
"""

from __future__ import annotations

import gzip
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
#: the layout of an ``.npz`` dataset, for the errors about one
NPZ_LAYOUT = ("an .npz dataset holds 'images' (uint8 [N,H,W] or [N,H,W,3], or float in [0,1]) and optionally 'labels' "
              "(integer class indices, or class-name strings) and 'class_names' (strings; integer labels index them)")
#: the layout of a folder dataset, for the error when a folder holds no image
FOLDER_LAYOUT = ("a folder dataset holds one subfolder per class of PNG/JPEG images (the subfolder names are the class "
                 "names), or PNG/JPEG images directly (unlabeled)")
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class DatasetError(ValueError):
    """A dataset could not be read, or does not fit what was asked of it."""


@dataclass(frozen=True)
class Dataset:
    images: np.ndarray
    labels: np.ndarray | None
    class_names: list[str] | None
    source: str

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8:
            raise DatasetError(f"{self.source}: images must be uint8, got {self.images.dtype}")
        if self.images.ndim not in (3, 4) or (self.images.ndim == 4 and self.images.shape[-1] not in (1, 3)):
            raise DatasetError(f"{self.source}: images must be [N,H,W] or [N,H,W,1|3], got {self.images.shape}")
        if self.labels is not None and len(self.labels) != len(self.images):
            raise DatasetError(f"{self.source}: {len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.images)

    def take(self, indices: np.ndarray) -> "Dataset":
        labels = None if self.labels is None else self.labels[indices]
        return Dataset(self.images[indices], labels, self.class_names, self.source)

    def select_classes(self, classes: Sequence[int]) -> "Dataset":
        """Keep the images of ``classes`` and relabel them 0..len(classes)-1 in the order given."""
        if self.labels is None:
            raise DatasetError(f"{self.source}: has no labels, cannot select classes")
        classes = list(classes)
        present = set(np.unique(self.labels).tolist())
        absent = [c for c in classes if c not in present]
        if absent:
            raise DatasetError(f"{self.source}: no images of class(es) {absent}; present: {sorted(present)}")
        mapping = np.full(int(max(present | set(classes))) + 1, -1, dtype=np.int64)
        mapping[classes] = np.arange(len(classes))
        keep = np.isin(self.labels, classes)
        names = [self.class_names[c] if self.class_names else str(c) for c in classes]
        return Dataset(self.images[keep], mapping[self.labels[keep]], names, self.source)


#: where the MNIST / Fashion-MNIST files are looked for: $OODGUARD_DATA, else ../shared/data beside the checkout
DATA_ENV = "OODGUARD_DATA"
#: how to get them: the official file names and the folder layout the benchmarks and tests expect
DATA_HELP = ("MNIST and Fashion-MNIST are the official IDX files, gzipped as published: "
             "<DATA>/mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz (from the MNIST site or a mirror) and "
             "<DATA>/fashion_mnist/ with the same four names (github.com/zalandoresearch/fashion-mnist); <DATA> is "
             f"${DATA_ENV}, else ../shared/data beside the checkout. Without them, 'digits' (scikit-learn's bundled "
             "set) works everywhere.")


def natural_key(name: str) -> tuple:
    """Sort key of a class name that orders its digit runs by number, the rest case-insensitively: ``'8'`` before
    ``'9'`` before ``'10'``, ``'class2'`` before ``'class10'``. New classes are appended in this order (a stable
    order that does not depend on which label was seen first); the name itself breaks ties."""
    parts = re.split(r"(\d+)", str(name))  # text, number, text, ...: the same kind at each position
    return tuple(int(part) if i % 2 else part.casefold() for i, part in enumerate(parts)), str(name)


def data_root() -> Path:
    """The folder holding mnist/ and fashion_mnist/ (see :data:`DATA_HELP`)."""
    configured = os.environ.get(DATA_ENV)
    return Path(configured) if configured else Path(__file__).resolve().parents[1].parent / "shared" / "data"


def load_dataset(spec: str | Path) -> Dataset:
    spec = str(spec)
    if spec == "digits":
        return _load_digits()
    path_part, _, key = spec.partition("#")
    path = Path(path_part)
    if path.is_dir():
        return _load_folder(path)
    if not path.exists():
        hint = f" {DATA_HELP}" if "idx" in path.name else ""
        raise DatasetError(f"dataset {spec!r} not found (expected 'digits', an IDX file, a .npz file or a folder).{hint}")
    if path.suffix == ".npz":
        return _load_npz(path, key or "images")
    if "idx" in path.name:
        return _load_idx_pair(path)
    raise DatasetError(f"{path}: unknown dataset format (expected IDX '*-idx3-ubyte[.gz]', .npz or a folder)")


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (optionally gzip-compressed) into an array of its declared type and shape."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as exc:
        raise DatasetError(f"{path}: cannot read IDX file ({exc})") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DatasetError(f"{path}: not an IDX file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DatasetError(f"{path}: header says shape {shape} but the file holds {len(raw) - header} data bytes")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def _load_idx_pair(path: Path) -> Dataset:
    images = read_idx(path)
    if images.ndim != 3:
        raise DatasetError(f"{path}: IDX images must be 3-D [N,H,W], got shape {images.shape}")
    if images.dtype != np.uint8:
        raise DatasetError(f"{path}: IDX images must be uint8 (type code 0x08), got {images.dtype}")
    labels = None
    label_path = path.with_name(path.name.replace("images-idx3", "labels-idx1"))
    if label_path != path and label_path.exists():
        labels = read_idx(label_path).astype(np.int64)
    return Dataset(np.ascontiguousarray(images), labels, None, str(path))


def _load_npz(path: Path, key: str) -> Dataset:
    try:
        with np.load(path, allow_pickle=False) as archive:
            if key not in archive.files:
                raise DatasetError(f"{path}: no array {key!r} (arrays: {archive.files}); use PATH.npz#KEY")
            images = archive[key]
            raw_labels = archive["labels"] if "labels" in archive.files else None
            class_names = [str(n) for n in archive["class_names"]] if "class_names" in archive.files else None
    except ValueError as exc:
        if isinstance(exc, DatasetError):
            raise
        # np.load refuses object arrays (a list of Python strings saved without dtype=str), which need pickle
        raise DatasetError(f"{path}: cannot read ({exc}); save strings as np.asarray(names, dtype=str). "
                           f"{NPZ_LAYOUT}") from None
    if images.dtype != np.uint8:
        if np.issubdtype(images.dtype, np.floating) and images.size and 0.0 <= images.min() and images.max() <= 1.0:
            images = np.round(images * 255.0).astype(np.uint8)
        else:
            raise DatasetError(f"{path}: images must be uint8 (or float in [0,1]), got {images.dtype}")
    labels = None
    if raw_labels is not None and len(raw_labels) == len(images):  # else e.g. a labels array of another key
        labels, class_names = _npz_labels(path, raw_labels, class_names)
    return Dataset(images, labels, class_names, f"{path}#{key}")


def _npz_labels(path: Path, raw: np.ndarray, class_names: list[str] | None) -> tuple[np.ndarray, list[str] | None]:
    """An .npz's ``labels`` as int64 class indices, and the class names they index.

    Integer labels (or whole-number floats) are indices, into ``class_names`` when present. String labels are
    class names (a labels array written by hand or by another tool): mapped into ``class_names`` when present,
    else the classes are their distinct values in :func:`natural_key` order. Anything else is an error that
    states the layout."""
    if raw.ndim != 1:
        raise DatasetError(f"{path}: 'labels' must be 1-D (one per image), got shape {raw.shape}; {NPZ_LAYOUT}")
    if raw.dtype.kind in "US":
        names = raw.astype(str)
        if class_names is None:
            class_names = sorted(set(names.tolist()), key=natural_key)
        index = {name: i for i, name in enumerate(class_names)}
        unknown = sorted(set(names.tolist()) - set(index), key=natural_key)
        if unknown:
            raise DatasetError(f"{path}: label(s) {unknown[:5]} are not in its class_names {class_names}; string "
                               "labels must be among them (or drop 'class_names': the distinct labels become the "
                               "classes)")
        return np.asarray([index[n] for n in names.tolist()], dtype=np.int64), class_names
    if raw.dtype.kind in "iub" or (raw.dtype.kind == "f" and np.all(np.isfinite(raw)) and np.all(raw == np.round(raw))):
        labels = raw.astype(np.int64)
    else:
        raise DatasetError(f"{path}: 'labels' of dtype {raw.dtype} are neither class indices nor class names; "
                           f"{NPZ_LAYOUT}")
    if class_names is not None and len(labels) and labels.max() >= len(class_names):
        raise DatasetError(f"{path}: label {int(labels.max())} has no name: class_names holds {len(class_names)} "
                           f"({class_names}); integer labels index class_names")
    return labels, class_names


def _load_folder(path: Path) -> Dataset:
    subdirs = sorted(p for p in path.iterdir() if p.is_dir())
    if subdirs:
        groups = [(i, sorted(f for f in d.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)) for i, d in enumerate(subdirs)]
        class_names: list[str] | None = [d.name for d in subdirs]
    else:
        groups = [(-1, sorted(f for f in path.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES))]
        class_names = None
    files = [(label, f) for label, fs in groups for f in fs]
    if not files:
        raise DatasetError(f"{path}: no PNG/JPEG images found; {FOLDER_LAYOUT}" + _other_datasets_hint(path))
    images = [decode_image(f.read_bytes(), source=str(f)) for _, f in files]
    shapes = {im.shape for im in images}
    if len(shapes) != 1:
        raise DatasetError(f"{path}: images have different shapes {sorted(shapes)[:4]}; resize them first")
    labels = np.array([label for label, _ in files], dtype=np.int64) if class_names else None
    return Dataset(np.stack(images), labels, class_names, str(path))


def _other_datasets_hint(path: Path) -> str:
    """For a folder without images: the dataset files it (or a subfolder) holds that are read by their own path,
    IDX images and .npz, named so the user can pass one instead; "" when there are none."""
    candidates = sorted(f for f in [*path.glob("*"), *path.glob("*/*")] if f.is_file() and (
        re.search(r"-idx3-ubyte(\.gz)?$", f.name) or f.suffix == ".npz"))
    if not candidates:
        return ""
    shown = ", ".join(str(f) for f in candidates[:3])
    if len(candidates) > 3:
        shown += f" (and {len(candidates) - 3} more)"
    kinds = " and ".join(k for k, present in (("IDX", any(f.suffix != ".npz" for f in candidates)),
                                               (".npz", any(f.suffix == ".npz" for f in candidates))) if present)
    return f". This folder holds {kinds} file(s); give that file's path as the dataset instead: {shown}"


def decode_image(data: bytes, source: str = "image") -> np.ndarray:
    """Decode PNG/JPEG bytes to uint8 ``[H,W]`` (grayscale) or ``[H,W,3]`` (anything else, as RGB)."""
    import io

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            converted = img.convert("L") if img.mode in ("L", "1", "I;16", "I", "F", "LA") else img.convert("RGB")
    except UnidentifiedImageError:
        raise DatasetError(f"{source}: not a PNG or JPEG image (or a corrupt one)") from None
    except Exception as exc:  # Pillow raises many types for corrupt input; its messages name the in-memory buffer
        detail = re.sub(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "the data", str(exc))
        raise DatasetError(f"{source}: cannot decode image ({type(exc).__name__}: {detail})") from None
    return np.asarray(converted, dtype=np.uint8)


def _load_digits() -> Dataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    return Dataset(images, bunch.target.astype(np.int64), [str(c) for c in bunch.target_names], "digits")


def stratified_split(labels: np.ndarray, fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """Split indices into disjoint parts with the given fractions per class (boundaries rounded per class).

    Fractions summing to 1 put every index in exactly one part; a smaller sum leaves the remainder out.
    """
    if not fractions or not all(f > 0 for f in fractions) or sum(fractions) > 1 + 1e-9:
        raise ValueError(f"fractions must be positive and sum to at most 1, got {list(fractions)}")
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in fractions]
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        bounds = np.round(np.cumsum(fractions) * len(idx)).astype(int)
        starts = np.concatenate([[0], bounds[:-1]])
        for part, start, stop in zip(parts, starts, bounds):
            part.append(idx[start:stop])
    return [np.sort(np.concatenate(p)) for p in parts]
