"""The `DataSource` interface: where images and original labels come from.

A source knows its classes and hands out, per split (``"train"`` / ``"test"``), a cheap label array and a map-style
dataset of ``(image, original_label)``. It knows nothing about tasks: `ContinualDataModule` turns a source into a task
sequence. Two kinds exist:

- fixed-size sources (``fixed_size = True``): every image is a uint8 ``3 x H x W`` tensor of one size held in memory
  (CIFAR-100, npz packs, the synthetic set). Batches go to the device as uint8 and are augmented there, batched.
- file sources (``fixed_size = False``): images of any size decoded from files (ImageFolder). The dataset yields
  ``PIL.Image`` (RGB); the datamodule crops/resizes them to ``image_size`` on the CPU; the device only converts dtype.

To add a source, subclass `ArraySource` (implement ``_load``) or `DataSource` directly, and type the constructor
arguments so the YAML/CLI can build it with ``class_path``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["Split", "DataSource", "ArraySource", "ArrayDataset"]

Split = Literal["train", "test"]


class DataSource(ABC):
    """A labelled image collection with a train and a test split.

    Subclasses set ``num_classes`` and ``class_names`` in ``__init__`` (cheaply: no image decoding) and raise clear
    errors there for missing files, so configuration problems surface before any compute.
    """

    #: True when images are same-size uint8 tensors (augmented batched on the device); False for PIL images of any size.
    fixed_size: ClassVar[bool] = True
    num_classes: int
    class_names: list[str]

    def prepare(self) -> None:  # noqa: B027 (optional hook, empty by default)
        """Download or otherwise create the files (called once per node from ``LightningDataModule.prepare_data``)."""

    @abstractmethod
    def labels(self, split: Split) -> np.ndarray:
        """Original label (int64) of every sample of ``split``, in dataset order; must not decode images."""

    @abstractmethod
    def dataset(self, split: Split) -> Dataset:
        """Map-style dataset of ``(image, original_label)``: image is a uint8 ``3 x H x W`` tensor when
        ``fixed_size`` else an RGB ``PIL.Image``."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_classes={self.num_classes})"


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
    """Base of fixed-size sources: subclasses implement ``_load(split) -> (uint8 N x 3 x H x W, int64 labels)``.

    Loaded arrays are cached on the instance, so each split is loaded (decoded, generated) at most once per process.
    Override `labels` when the labels are available without loading the images.
    """

    fixed_size: ClassVar[bool] = True

    @abstractmethod
    def _load(self, split: Split) -> tuple[np.ndarray, np.ndarray]:
        """Load ``split`` as ``(images uint8 N x 3 x H x W, labels int64 N)``."""

    def arrays(self, split: Split) -> tuple[np.ndarray, np.ndarray]:
        """The cached ``(images, labels)`` of ``split``."""
        cache = self.__dict__.setdefault("_array_cache", {})
        if split not in cache:
            if split not in ("train", "test"):
                raise ValueError(f"split must be 'train' or 'test', got {split!r}")
            images, labels = self._load(split)
            cache[split] = (np.ascontiguousarray(images), np.asarray(labels, dtype=np.int64))
        return cache[split]

    def labels(self, split: Split) -> np.ndarray:
        return self.arrays(split)[1]

    def dataset(self, split: Split) -> ArrayDataset:
        return ArrayDataset(*self.arrays(split))

    def __getstate__(self) -> dict:
        # Dataloader workers get the datasets (which hold the arrays); do not pickle the cache a second time.
        state = dict(self.__dict__)
        state.pop("_array_cache", None)
        return state
