"""Data: sources, pure split functions, device-side augmentation and the continual datamodule.

``ContinualDataModule(source=...)`` turns any `DataSource` (``SyntheticShapes`` offline, ``CIFAR100``,
``ImageFolderSource`` for ImageNet-R, Tiny-ImageNet or your own folders, ``NpzSource`` for npz packs) into a
class-incremental task sequence whose loaders yield ``(images, targets, task_ids)``. Every source takes ``classes``
(names, indices or a seeded subset: `select_classes`); `pack_folder` / `pack_arrays` (``cdl pack``) write npz packs.
"""

from cdl_lightning.data.augment import EvalResize, RandomResizedCropFlip
from cdl_lightning.data.cifar import CIFAR100
from cdl_lightning.data.datamodule import ContinualDataModule
from cdl_lightning.data.datasets import EvalCrop, PredictCollate, PredictDataset, TaskDataset, TrainCrop
from cdl_lightning.data.folder import FileDataset, ImageFolderSource, find_corrupt_images, to_rgb
from cdl_lightning.data.loaders import ResumableDataLoader, ResumableSampler
from cdl_lightning.data.npz import NpzSource
from cdl_lightning.data.pack import pack_arrays, pack_folder, pack_npz
from cdl_lightning.data.source import ArrayDataset, ArraySource, DataSource, SelectedDataset
from cdl_lightning.data.splits import (
    ClassSelection,
    remap_labels,
    resolve_class_order,
    select_classes,
    split_per_class,
    task_of_labels,
    task_offsets,
    task_ranges,
    task_sizes,
)
from cdl_lightning.data.synthetic import SyntheticShapes

__all__ = [
    "ArrayDataset",
    "ArraySource",
    "CIFAR100",
    "ClassSelection",
    "ContinualDataModule",
    "DataSource",
    "EvalCrop",
    "EvalResize",
    "FileDataset",
    "ImageFolderSource",
    "NpzSource",
    "PredictCollate",
    "PredictDataset",
    "RandomResizedCropFlip",
    "ResumableDataLoader",
    "ResumableSampler",
    "SelectedDataset",
    "SyntheticShapes",
    "TaskDataset",
    "TrainCrop",
    "find_corrupt_images",
    "pack_arrays",
    "pack_folder",
    "pack_npz",
    "remap_labels",
    "resolve_class_order",
    "select_classes",
    "split_per_class",
    "task_of_labels",
    "task_offsets",
    "task_ranges",
    "task_sizes",
    "to_rgb",
]
