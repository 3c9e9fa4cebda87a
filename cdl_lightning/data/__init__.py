"""Data: sources, pure split functions, device-side augmentation and the continual datamodule.

``ContinualDataModule(source=...)`` turns any `DataSource` (``SyntheticShapes`` offline, ``CIFAR100``,
``ImageFolderSource`` for ImageNet-R, ``NpzSource`` for npz packs) into a class-incremental task sequence whose
loaders yield ``(images, targets, task_ids)``.
"""

from cdl_lightning.data.augment import EvalResize, RandomResizedCropFlip
from cdl_lightning.data.cifar import CIFAR100
from cdl_lightning.data.datamodule import ContinualDataModule
from cdl_lightning.data.datasets import EvalCrop, PredictDataset, TaskDataset, TrainCrop
from cdl_lightning.data.folder import FileDataset, ImageFolderSource
from cdl_lightning.data.loaders import ResumableDataLoader, ResumableSampler
from cdl_lightning.data.npz import NpzSource
from cdl_lightning.data.source import ArrayDataset, ArraySource, DataSource
from cdl_lightning.data.splits import (
    remap_labels,
    resolve_class_order,
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
    "ContinualDataModule",
    "DataSource",
    "EvalCrop",
    "EvalResize",
    "FileDataset",
    "ImageFolderSource",
    "NpzSource",
    "PredictDataset",
    "RandomResizedCropFlip",
    "ResumableDataLoader",
    "ResumableSampler",
    "SyntheticShapes",
    "TaskDataset",
    "TrainCrop",
    "remap_labels",
    "resolve_class_order",
    "split_per_class",
    "task_of_labels",
    "task_offsets",
    "task_ranges",
    "task_sizes",
]
