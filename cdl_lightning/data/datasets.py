"""Datasets the datamodule hands to its loaders: task subsets of a source, CPU crops for file sources, predict files."""

from __future__ import annotations

import copy
import math
from typing import Literal

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode

from cdl_lightning.data.augment import EvalResize, seeded_crop_box
from cdl_lightning.data.folder import load_rgb

__all__ = ["TaskDataset", "TrainCrop", "EvalCrop", "PredictDataset", "PredictCollate"]


class TrainCrop:
    """CPU RandomResizedCrop + horizontal flip of a PIL image to a uint8 ``3 x size x size`` tensor.

    Parameters are drawn from the numpy generator passed per call (the datamodule seeds it from
    ``(seed, epoch, sample)``), so the crop of a sample does not depend on worker count, order or resumption.
    """

    def __init__(
        self,
        size: int,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
    ) -> None:
        self.size, self.scale, self.ratio, self.hflip = size, scale, ratio, hflip

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> torch.Tensor:
        top, left, h, w = seeded_crop_box(rng, image.height, image.width, self.scale, self.ratio)
        image = TF.resized_crop(image, top, left, h, w, [self.size, self.size], InterpolationMode.BILINEAR)
        if rng.random() < self.hflip:
            image = TF.hflip(image)
        return TF.pil_to_tensor(image)


class EvalCrop:
    """CPU evaluation transform of a PIL image to a uint8 ``3 x size x size`` tensor.

    ``"resize"``: shorter side to ``size`` then centre crop ``size`` (a no-op crop for square images);
    ``"resize_center_crop"``: shorter side to ``floor(size / crop_pct)`` then centre crop ``size``.
    """

    def __init__(
        self, size: int, mode: Literal["resize", "resize_center_crop"] = "resize", crop_pct: float = 0.875
    ) -> None:
        self.size, self.mode, self.crop_pct = size, mode, crop_pct

    def __call__(self, image: Image.Image, rng: np.random.Generator | None = None) -> torch.Tensor:
        short = self.size if self.mode == "resize" else int(math.floor(self.size / self.crop_pct))
        image = TF.resize(image, short, InterpolationMode.BILINEAR)
        return TF.pil_to_tensor(TF.center_crop(image, [self.size, self.size]))


class TaskDataset(Dataset):
    """The samples of some tasks: items ``(image, target, task_id)``.

    ``image`` is the source's uint8 ``3 x H x W`` tensor, or for file sources the output of ``transform`` (a
    `TrainCrop` / `EvalCrop`). ``target`` is the remapped label, ``task_id`` its task.

    Args:
        base: The source's dataset of ``(image, original_label)``.
        indices: Positions in ``base`` of the samples, in order.
        targets: Remapped label of each of those samples.
        task_ids: Task of each of those samples.
        transform: CPU transform ``(PIL image, numpy Generator) -> uint8 tensor`` (file sources), or None.
        seed: Seed of the per-sample generators given to ``transform``.
        epoch: Epoch mixed into those seeds (see `with_epoch`).
    """

    def __init__(
        self,
        base: Dataset,
        indices: np.ndarray,
        targets: np.ndarray,
        task_ids: np.ndarray,
        transform: TrainCrop | EvalCrop | None = None,
        seed: int = 0,
        epoch: int = 0,
    ) -> None:
        if not len(indices) == len(targets) == len(task_ids):
            raise ValueError("indices, targets and task_ids must have the same length")
        self.base = base
        self.indices = np.asarray(indices, dtype=np.int64)
        self.targets = np.asarray(targets, dtype=np.int64)
        self.task_ids = np.asarray(task_ids, dtype=np.int64)
        self.transform = transform
        self.seed = seed
        self.epoch = epoch

    def with_epoch(self, epoch: int) -> TaskDataset:
        """A shallow copy whose random transforms are seeded for ``epoch`` (shares the base data)."""
        view = copy.copy(self)
        view.epoch = epoch
        return view

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        index = int(self.indices[i])
        image, _ = self.base[index]
        if self.transform is not None:
            rng = (
                np.random.default_rng([self.seed, self.epoch, index]) if isinstance(self.transform, TrainCrop) else None
            )
            image = self.transform(image, rng)
        return image, int(self.targets[i]), int(self.task_ids[i])


class PredictDataset(Dataset):
    """Image files for prediction: items ``(uint8 3 x S x S tensor, index into paths)``.

    With a ``transform`` (file sources: the same `EvalCrop` as their validation) the image is resized on the CPU;
    without one (fixed-size sources) it is returned at its own size, to be resized exactly as validation images are (see
    `PredictCollate`). Any image mode is converted to RGB first.
    """

    def __init__(self, paths: list[str], transform: EvalCrop | None = None) -> None:
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = load_rgb(self.paths[index])
        return (TF.pil_to_tensor(image) if self.transform is None else self.transform(image)), index


class PredictCollate:
    """Batches prediction images of fixed-size sources with the validation transform of those sources.

    Images of one size are stacked as uint8 and go through the same device-side `EvalResize` as validation batches
    (``on_after_batch_transfer``), so an image gets the same logits in ``cdl validate``, ``test`` and ``predict``.
    A batch of mixed sizes is resized here, image by image, with that same `EvalResize` (float32 in [0, 1]).
    """

    def __init__(self, eval_resize: EvalResize) -> None:
        self.eval_resize = eval_resize

    def __call__(self, items: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        images = [image for image, _ in items]
        index = torch.tensor([i for _, i in items], dtype=torch.int64)
        if len({tuple(image.shape) for image in images}) == 1:
            return torch.stack(images), index
        with torch.no_grad():
            resized = [self.eval_resize(image[None].to(torch.float32).div_(255.0))[0] for image in images]
        return torch.stack(resized), index
