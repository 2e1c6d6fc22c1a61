"""What a training run trains on: one or more labeled datasets, by reference, with one class list.

A run's data is a list of *sources*, each a dataset spec (``digits``, an IDX file, an ``.npz`` such as the one
``oodguard labels import`` writes, a folder), an optional label selection (``--classes``) and that source's own
train / calibration / test split (indices into the class-selected dataset). Nothing is copied: a later run
built on this one (``oodguard train --base RUN``) re-reads the same specs and keeps their splits, so the old
calibration and test images never enter its training set.

Classes are matched **by name** across sources: a run's class list starts with the base run's classes in their
order (their indices never change; without a base run, the first source's classes in its own order) and appends
the names the other sources bring in sorted order (natural: digits by number, so '8' gets the lower index than
'9' whichever a labels file happened to list first; see :func:`oodguard.datasets.natural_key`). A
name that differs from an existing one only in letter case is an error (``"Cat"`` next to ``"cat"`` is almost
always a labeling slip). A source without class names (IDX files) names its labels by their number.

Sources of different image sizes (8x8 digits and the 28x28 images ``labels import`` writes) are brought to the
run's input size (and channels) with the run's preprocessing steps before they are joined; the normalisation
is applied later, as always. Sources of one shape are joined as they are.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from oodguard.datasets import Dataset, DatasetError, load_dataset, natural_key, stratified_split
from oodguard.preprocess import Preprocessing

SPLITS = ("train", "calibration", "test")


@dataclass
class Source:
    data: str  # dataset spec
    classes: list[int] | None  # labels kept (and relabelled 0..n-1 in this order), None = all
    splits: dict[str, list[int]]  # indices into the class-selected dataset

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> "Source":
        return cls(str(raw["data"]), raw.get("classes"), {k: list(v) for k, v in raw["splits"].items()})

    def load(self, of_base_run: bool = True) -> Dataset:
        """The class-selected dataset the split indices refer to; a clear error when it is gone (naming the
        base run's record when the source comes from one)."""
        try:
            data = load_dataset(self.data)
        except DatasetError as exc:
            if not of_base_run:
                raise
            raise DatasetError(f"training data {self.data!r} of the base run cannot be read ({exc}); restore it or "
                               "train without --base") from None
        if data.labels is None:
            raise DatasetError(f"{data.source}: training needs labels")
        return data.select_classes(self.classes) if self.classes is not None else data


def label_names(data: Dataset) -> list[str]:
    """Names of the dataset's labels 0..max (its class names, else the numbers)."""
    if data.class_names:
        return [str(n) for n in data.class_names]
    return [str(c) for c in range(int(data.labels.max()) + 1)] if len(data.labels) else []


def merge_class_names(existing: Sequence[str], new: Sequence[str]) -> list[str]:
    """``existing`` in order, then the names of ``new`` not among them, in natural sort order
    (:func:`~oodguard.datasets.natural_key`: ``'8'`` before ``'9'`` before ``'10'``), so a class's index does not
    depend on which label came first. With ``existing`` empty, ``new`` is the first source's class list and keeps
    its order (its label numbering, a ``--classes`` order). A name that differs from another only in letter case
    is an error."""
    merged = list(existing)
    folded = {name.casefold(): name for name in merged}
    added: list[str] = []
    for name in new:
        if name in merged or name in added:
            continue
        if name.casefold() in folded:
            raise ValueError(f"class {name!r} differs from the existing class {folded[name.casefold()]!r} only in "
                             "letter case; rename it in the labels (or keep the existing name)")
        added.append(name)
        folded[name.casefold()] = name
    return merged + (sorted(added, key=natural_key) if merged else added)


def describe_appended(class_names: Sequence[str], first_new: int) -> str:
    """The line that says which classes were appended to a run's list and at which index, e.g.
    ``new classes, appended in sorted order: 8 → index 8, 9 → index 9`` ("" when none were)."""
    appended = list(class_names)[first_new:]
    if not appended:
        return ""
    return "new classes, appended in sorted order: " + ", ".join(
        f"{name} → index {first_new + i}" for i, name in enumerate(appended))


def new_source(spec: str, classes: list[int] | None, fractions: Sequence[float], seed: int) -> tuple[Source, Dataset]:
    """A source for a dataset given to this run, split by class like every source."""
    source = Source(str(spec), list(classes) if classes is not None else None, {})
    data = source.load(of_base_run=False)
    if len(data) == 0:
        raise ValueError(f"training data {spec!r} holds no labeled image")
    parts = stratified_split(data.labels, fractions, seed)
    source.splits = {name: part.tolist() for name, part in zip(SPLITS, parts)}
    return source, data


def combine(sources: Sequence[Source], class_names: Sequence[str], prep: Preprocessing | None = None,
            loaded: dict[int, Dataset] | None = None) -> tuple[Dataset, dict[str, np.ndarray]]:
    """One dataset of every source (labels mapped by name into ``class_names``) and the run's splits as indices
    into it. Images stay as they are when every source has the same image shape; otherwise ``prep``'s channel
    and resize steps bring them all to the run's input size (an error without ``prep``)."""
    datasets = [(loaded or {}).get(i) or source.load() for i, source in enumerate(sources)]
    shapes = {d.images.shape[1:] for d in datasets}
    if len(shapes) > 1 and prep is None:
        raise ValueError(f"the training sources have images of different shapes {sorted(shapes)}; train the first "
                         "alone, then add the others with --base (its preprocessing converts them)")
    images, labels, splits = [], [], {name: [] for name in SPLITS}
    offset = 0
    for source, data in zip(sources, datasets):
        names = label_names(data)
        missing = [n for n in names if n not in class_names]
        if missing:
            raise ValueError(f"{source.data}: class(es) {missing} are not among the run's classes {list(class_names)}")
        mapping = np.asarray([list(class_names).index(n) for n in names], dtype=np.int64)
        images.append(prep.to_size(data.images) if len(shapes) > 1 else data.images)
        labels.append(mapping[data.labels])
        for name in SPLITS:
            splits[name].append(np.asarray(source.splits[name], dtype=np.int64) + offset)
        offset += len(data)
    dataset = Dataset(np.concatenate(images), np.concatenate(labels), list(class_names),
                      " + ".join(s.data for s in sources))
    return dataset, {name: np.concatenate(parts) for name, parts in splits.items()}


def balancing_weights(labels: np.ndarray, mode: str) -> np.ndarray | None:
    """Per-sample weights for class-balanced sampling (each class drawn equally often), or None.

    ``mode``: ``on``, ``off``, or ``auto`` — on when the largest class has more than 10 times the samples of the
    smallest (50 labels of a new class next to 6,000 of each old one would otherwise be drowned out)."""
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"balance must be auto, on or off, got {mode!r}")
    counts = np.bincount(labels)
    present = counts[counts > 0]
    if mode == "off" or (mode == "auto" and present.max() <= 10 * present.min()):
        return None
    return (1.0 / counts[labels]).astype(np.float64)


__all__ = ["Source", "SPLITS", "label_names", "merge_class_names", "describe_appended", "new_source", "combine",
           "balancing_weights"]
