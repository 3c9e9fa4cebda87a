"""The `DataSource` interface: where images and original labels come from.

A source knows its classes and hands out, per split (``"train"`` / ``"test"``), a cheap label array and a map-style
dataset of ``(image, label)``. It knows nothing about tasks: `ContinualDataModule` turns a source into a task
sequence. Two kinds exist:

- fixed-size sources (``fixed_size = True``): every image is a uint8 ``3 x H x W`` tensor of one size held in memory
  (CIFAR-100, npz packs, the synthetic set). Batches go to the device as uint8 and are augmented there, batched.
- file sources (``fixed_size = False``): images of any size decoded from files (ImageFolder). The dataset yields
  ``PIL.Image`` (RGB); the datamodule crops/resizes them to ``image_size`` on the CPU; the device only converts dtype.

Every source takes ``classes`` (see `select_classes`): a list of class names or indices, or a seeded random subset.
The base class applies the selection once for all sources: ``class_names``/``num_classes`` describe the kept classes,
labels are renumbered ``0..k-1`` in selection order and samples of other classes are left out.

To add a source, subclass `ArraySource` (implement ``_load``) or `DataSource` directly (implement ``_labels`` and
``_dataset`` over all classes, set ``class_names`` and end ``__init__`` with ``self.select(classes)``), and type the
constructor arguments so the YAML/CLI can build it with ``class_path``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from cdl_lightning.data.splits import ClassSelection, select_classes

__all__ = ["Split", "DataSource", "ArraySource", "ArrayDataset", "SelectedDataset", "check_labels"]

Split = Literal["train", "test"]


class DataSource(ABC):
    """A labelled image collection with a train and a test split, optionally restricted to some classes.

    Subclasses set ``class_names`` (all classes) in ``__init__`` cheaply (no image decoding), raise clear errors there
    for missing or malformed files, so configuration problems surface before any compute, and finish with
    ``self.select(classes)``. They implement ``_labels`` / ``_dataset`` over all classes; `labels` / `dataset` apply
    the selection.
    """

    #: True when images are same-size uint8 tensors (augmented batched on the device); False for PIL images of any size.
    fixed_size: ClassVar[bool] = True
    num_classes: int
    class_names: list[str]
    #: Names of every class of the underlying collection (index = stored label), before the selection.
    all_class_names: list[str]
    #: Stored labels of the kept classes, in new-label order; ``None`` when every class is kept.
    selected_classes: list[int] | None = None
    #: Other identifiers of the (kept) classes that ``classes``/``class_order`` may name, e.g. WordNet ids; or None.
    class_ids: list[str] | None = None

    def select(self, classes: ClassSelection | None = None) -> None:
        """Keep only ``classes`` (see `select_classes`); sets ``all_class_names``, ``selected_classes``,
        ``class_names``, ``class_ids`` and ``num_classes``. Call once, at the end of ``__init__``, after ``class_names``
        (and ``class_ids``, if the classes have ids besides their names) is set."""
        self.all_class_names = [str(n) for n in self.class_names]
        all_ids = None if self.class_ids is None else [str(c) for c in self.class_ids]
        self.selected_classes = select_classes(self.all_class_names, classes, all_ids)
        kept = self.selected_classes if self.selected_classes is not None else range(len(self.all_class_names))
        self.class_names = [self.all_class_names[c] for c in kept]
        self.class_ids = None if all_ids is None else [all_ids[c] for c in kept]
        self.num_classes = len(self.class_names)
        self._new_label = np.full(len(self.all_class_names), -1, dtype=np.int64)
        self._new_label[np.asarray(list(kept), dtype=np.int64)] = np.arange(self.num_classes)

    def prepare(self) -> None:  # noqa: B027 (optional hook, empty by default)
        """Download or otherwise create the files (called once per node from ``LightningDataModule.prepare_data``)."""

    @abstractmethod
    def _labels(self, split: Split) -> np.ndarray:
        """Stored label (int64, index into ``all_class_names``) of every sample of ``split``; must not decode images."""

    @abstractmethod
    def _dataset(self, split: Split) -> Dataset:
        """Map-style dataset of ``(image, stored_label)`` over every sample of ``split``: image is a uint8
        ``3 x H x W`` tensor when ``fixed_size`` else an RGB ``PIL.Image``."""

    def sample_indices(self, split: Split) -> np.ndarray | None:
        """Positions (int64, in order) of the kept samples among all samples of ``split``; ``None``: all are kept."""
        if self.selected_classes is None:
            return None
        cache = self.__dict__.setdefault("_sample_index_cache", {})
        if split not in cache:
            cache[split] = np.flatnonzero(self._new_label[self._stored_labels(split)] >= 0).astype(np.int64)
        return cache[split]

    def labels(self, split: Split) -> np.ndarray:
        """Label (int64, in ``[0, num_classes)``) of every kept sample of ``split``, in dataset order."""
        stored = self._stored_labels(split)
        keep = self.sample_indices(split)
        return stored if keep is None else self._new_label[stored[keep]]

    def dataset(self, split: Split) -> Dataset:
        """Map-style dataset of ``(image, label)`` over the kept samples of ``split``."""
        keep = self.sample_indices(split)
        base = self._dataset(split)
        return base if keep is None else SelectedDataset(base, keep, self.labels(split))

    def _stored_labels(self, split: Split) -> np.ndarray:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if not hasattr(self, "all_class_names"):
            raise RuntimeError(f"{type(self).__name__}.__init__ must end with self.select(classes)")
        return np.asarray(self._labels(split), dtype=np.int64)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_classes={self.num_classes})"

    def _selection_repr(self) -> str:
        if self.selected_classes is None:
            return ""
        return f", kept {self.num_classes} of {len(self.all_class_names)} classes"


class SelectedDataset(Dataset):
    """The samples at ``indices`` of ``base``, with their labels replaced by ``labels`` (a class selection)."""

    def __init__(self, base: Dataset, indices: np.ndarray, labels: np.ndarray) -> None:
        if len(indices) != len(labels):
            raise ValueError(f"{len(indices)} indices but {len(labels)} labels")
        self.base, self.indices, self.labels = base, np.asarray(indices, np.int64), np.asarray(labels, np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[object, int]:
        image, _ = self.base[int(self.indices[index])]
        return image, int(self.labels[index])


def check_labels(labels: np.ndarray, num_classes: int, where: str) -> np.ndarray:
    """``labels`` as int64 after checking they are integers in ``[0, num_classes)``; ``where`` names the file/split."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"{where}: labels must be a 1-d array, got shape {labels.shape}")
    if len(labels) and not np.issubdtype(labels.dtype, np.integer):
        if not np.issubdtype(labels.dtype, np.floating) or not np.array_equal(labels, np.round(labels)):
            raise ValueError(f"{where}: labels must be integers, got dtype {labels.dtype}")
    labels = labels.astype(np.int64)
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        bad = labels[(labels < 0) | (labels >= num_classes)]
        raise ValueError(
            f"{where}: {len(bad)} labels fall outside [0, {num_classes}) (e.g. {sorted(set(bad.tolist()))[:5]}); "
            "labels must index the class names"
        )
    return labels


class ArrayDataset(Dataset):
    """Dataset over an in-memory uint8 array ``N x 3 x H x W`` and int64 labels; items are zero-copy tensor views."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        if images.ndim != 4 or images.shape[1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 N x 3 x H x W, got {images.dtype} {images.shape}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = torch.from_numpy(np.ascontiguousarray(images))
        self.labels = torch.from_numpy(np.asarray(labels, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])


class ArraySource(DataSource):
    """Base of fixed-size sources: subclasses implement ``_load(split) -> (uint8 N x 3 x H x W, int64 labels)`` over
    all classes.

    `arrays` applies the class selection and caches the result on the instance, so each split is loaded (decoded,
    generated) at most once per process. Override ``_labels`` when the labels are available without loading images.
    """

    fixed_size: ClassVar[bool] = True

    @abstractmethod
    def _load(self, split: Split) -> tuple[np.ndarray, np.ndarray]:
        """Load ``split`` as ``(images uint8 N x 3 x H x W, stored labels int64 N)`` (every class)."""

    def arrays(self, split: Split) -> tuple[np.ndarray, np.ndarray]:
        """The cached ``(images uint8 N x 3 x H x W, labels int64 N)`` of the kept classes of ``split``."""
        cache = self.__dict__.setdefault("_array_cache", {})
        if split not in cache:
            if split not in ("train", "test"):
                raise ValueError(f"split must be 'train' or 'test', got {split!r}")
            images, labels = self._load(split)
            if len(images) != len(labels):
                raise ValueError(f"{self!r}: {split} has {len(images)} images but {len(labels)} labels")
            labels = np.asarray(labels, dtype=np.int64)
            if self.selected_classes is not None:
                keep = np.flatnonzero(self._new_label[labels] >= 0)
                images, labels = images[keep], self._new_label[labels[keep]]
            cache[split] = (np.ascontiguousarray(images), np.asarray(labels, dtype=np.int64))
        return cache[split]

    def _labels(self, split: Split) -> np.ndarray:
        return self._load(split)[1]

    def _dataset(self, split: Split) -> ArrayDataset:
        return ArrayDataset(*self._load(split))

    def labels(self, split: Split) -> np.ndarray:
        cache = self.__dict__.get("_array_cache", {})
        if split in cache or type(self)._labels is ArraySource._labels:  # no cheap label path: load once, keep
            return self.arrays(split)[1]
        return super().labels(split)

    def dataset(self, split: Split) -> ArrayDataset:
        return ArrayDataset(*self.arrays(split))

    def __getstate__(self) -> dict:
        # Dataloader workers get the datasets (which hold the arrays); do not pickle the cache a second time.
        state = dict(self.__dict__)
        state.pop("_array_cache", None)
        return state
