"""Batches of a fixed-size in-memory source served from one uint8 tensor on the training device.

A fixed-size source (`NpzSource`, `CIFAR100`, `SyntheticShapes`) holds every image of a split as one uint8
``N x 3 x H x W`` array, and its augmentation already runs batched on the device (`RandomResizedCropFlip` in the data
module's ``on_after_batch_transfer``). The only host work left per batch is indexing 64 images, collating them and the
host-to-device copy, plus the ``DataLoader`` (and its worker processes) rebuilt for every epoch. `DeviceImages` puts a
split on the device once; `DeviceLoader` indexes it there with the *same* sampler indices, batch boundaries and
``(images uint8, targets int64, task_ids int64)`` batches as the ``DataLoader`` path, so every number downstream
(augmentation, losses, metrics) is bitwise the same, and it consumes no random numbers (the samplers and the
``DataLoader`` path use their own generators), so the global streams are untouched too.

`DeviceLoader` keeps `ResumableDataLoader`'s mid-epoch resume state (the same ``state_dict`` format: a checkpoint
written with one loader resumes exactly with the other) and is not a ``DataLoader``, so Lightning neither re-wraps its
sampler under DDP nor moves its batches (they are already on the device).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor
from torch.utils.data import Sampler

from cdl_lightning.data.datasets import TaskDataset
from cdl_lightning.data.loaders import ResumableDataLoader, ResumableSampler
from cdl_lightning.data.source import ArrayDataset

__all__ = ["DeviceImages", "DeviceLoader", "ResumableDeviceLoader", "device_bytes"]


def device_bytes(dataset: TaskDataset) -> int:
    """Bytes the base split of ``dataset`` takes on the device (images, labels)."""
    base = dataset.base
    if not isinstance(base, ArrayDataset):
        raise TypeError(f"device data needs a fixed-size in-memory source (ArrayDataset), got {type(base).__name__}")
    return base.images.numel() * base.images.element_size() + base.labels.numel() * 8


class DeviceImages:
    """A fixed-size source split's uint8 images on ``device`` (copied once; shared by every task's loader)."""

    def __init__(self, base: ArrayDataset, device: torch.device) -> None:
        if not isinstance(base, ArrayDataset):
            raise TypeError(f"device data needs a fixed-size in-memory source (ArrayDataset), got "
                            f"{type(base).__name__}: set data.device_data to false")
        self.device = torch.device(device)
        self.images = base.images.to(self.device)


class DeviceLoader:
    """Batches ``(images, targets, task_ids)`` of a `TaskDataset` indexed on the device, in ``sampler`` order.

    Args:
        images: the dataset's base split on the device (`DeviceImages`).
        dataset: the task subset (positions into the base split, remapped targets, task ids).
        sampler: yields positions into ``dataset`` (a `ResumableSampler` for training: resumable; any sampler or
            sequence for evaluation).
        batch_size: samples per batch (the last one may be smaller unless ``drop_last``).
        drop_last: drop the last incomplete batch.
    """

    def __init__(
        self,
        images: DeviceImages,
        dataset: TaskDataset,
        sampler: Sampler | Sequence[int],
        batch_size: int,
        drop_last: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.images, self.dataset, self.sampler = images, dataset, sampler
        self.batch_size, self.drop_last = batch_size, drop_last
        self.batch_sampler = None  # read by Lightning's shuffle check, as on a DataLoader with a sampler
        device = images.device
        self._positions = torch.as_tensor(dataset.indices, dtype=torch.long).to(device)
        self._targets = torch.as_tensor(dataset.targets, dtype=torch.long).to(device)
        self._task_ids = torch.as_tensor(dataset.task_ids, dtype=torch.long).to(device)
        self._batches_yielded = 0
        self._resume_batches = 0  # set by ResumableDeviceLoader.load_state_dict

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        start, self._resume_batches = self._resume_batches, 0
        if isinstance(self.sampler, ResumableSampler):
            self.sampler.start = start * self.batch_size
        elif start:
            raise RuntimeError("only a ResumableSampler loader resumes mid-epoch")
        self._batches_yielded = start
        order = torch.as_tensor(list(iter(self.sampler)), dtype=torch.long)
        if self.drop_last:
            order = order[: len(order) // self.batch_size * self.batch_size]
        order = order.to(self.images.device, non_blocking=True)
        return self._batches(order)

    def _batches(self, order: Tensor) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        for begin in range(0, len(order), self.batch_size):
            rows = order[begin : begin + self.batch_size]
            batch = (self.images.images.index_select(0, self._positions.index_select(0, rows)),
                     self._targets.index_select(0, rows), self._task_ids.index_select(0, rows))
            self._batches_yielded += 1
            yield batch

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(samples={len(self.sampler)}, batch_size={self.batch_size}, "
                f"device={self.images.device})")


class ResumableDeviceLoader(DeviceLoader):
    """A training `DeviceLoader` over a `ResumableSampler` with `ResumableDataLoader`'s mid-epoch resume state (the
    same ``state_dict`` format: a checkpoint written with one loader resumes exactly with the other)."""

    def __init__(self, images: DeviceImages, dataset: TaskDataset, sampler: ResumableSampler, batch_size: int,
                 drop_last: bool = False) -> None:
        if not isinstance(sampler, ResumableSampler):
            raise TypeError(f"sampler must be a ResumableSampler, got {type(sampler).__name__}")
        super().__init__(images, dataset, sampler, batch_size, drop_last)

    _shard = ResumableDataLoader._shard
    state_dict = ResumableDataLoader.state_dict
    load_state_dict = ResumableDataLoader.load_state_dict
