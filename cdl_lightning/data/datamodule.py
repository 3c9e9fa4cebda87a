"""`ContinualDataModule`: a `DataSource` served as a class-incremental task sequence inside one ``trainer.fit``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, SequentialSampler
from typing_extensions import override

from cdl_lightning.data.augment import EvalResize, RandomResizedCropFlip
from cdl_lightning.data.datasets import EvalCrop, PredictCollate, PredictDataset, TaskDataset, TrainCrop
from cdl_lightning.data.device_loader import DeviceImages, DeviceLoader, ResumableDeviceLoader, device_bytes
from cdl_lightning.data.folder import _cpu_count, list_images
from cdl_lightning.data.loaders import ResumableDataLoader, ResumableSampler, derive_seed
from cdl_lightning.data.source import ArrayDataset, DataSource, Split
from cdl_lightning.data.splits import (
    interleave_classes,
    remap_labels,
    resolve_class_order,
    task_of_labels,
    task_sample_indices,
)
from cdl_lightning.data.splits import task_sizes as split_task_sizes
from cdl_lightning.data.synthetic import SyntheticShapes
from cdl_lightning.nn.graphs import GraphedFunction
from cdl_lightning.progress import evaluated_epoch
from cdl_lightning.tasks import TaskSchedule

__all__ = ["ContinualDataModule"]


def _to_float(images: Tensor) -> Tensor:
    """uint8 images -> float32 in [0, 1] (float images unchanged)."""
    return images.to(torch.float32).div_(255.0) if not images.is_floating_point() else images


class ContinualDataModule(LightningDataModule):
    """Class-incremental task sequence over a `DataSource`, one task after another within one ``trainer.fit``.

    The classes are put in ``class_order`` and cut into tasks of ``task_sizes`` classes; task ``t`` owns the remapped
    labels ``[task_offsets[t], task_offsets[t] + task_sizes[t])``. Epoch ``e`` of the fit trains task
    ``min(e // epochs_per_task, num_tasks - 1)``: run the trainer with ``max_epochs = num_tasks * epochs_per_task``,
    ``reload_dataloaders_every_n_epochs=1`` and ``check_val_every_n_epoch=epochs_per_task``.

    Batches (every loader): ``(images, targets, task_ids)``; images uint8 ``B x 3 x H x W`` on the CPU, float32 in
    [0, 1] and ``image_size`` square after `on_after_batch_transfer` (no mean/std normalisation: the model does it);
    targets are remapped labels, task_ids the task of each sample (int64). Predict batches: ``(images, index)`` with
    ``index`` into `predict_paths`.

    Everything that can be checked is checked in ``__init__`` (paths, class order, task split), before any compute.

    Args:
        source: Where the images come from; ``None`` builds the offline ``SyntheticShapes()``.
        num_tasks: Number of tasks.
        first_task_classes: Classes of the first task (the rest are split evenly); ``None`` splits all classes evenly.
        class_order: ``"natural"`` (0..C-1: the reference's order, needed to compare with the paper), ``"random"``
            (a permutation seeded by ``seed``) or an explicit list: entry ``i`` is the source label or the class name
            of class ``i`` (unknown names are an error listing close matches).
        seed: Seed of the random class order, the shuffling (per epoch) and the CPU crops of file sources.
        epochs_per_task: Training epochs of each task.
        batch_size: Training batch size (per device).
        eval_batch_size: Validation/test/predict batch size; ``None`` uses ``batch_size``.
        num_workers: DataLoader worker processes; ``None`` (auto): 0 for in-memory sources (fixed-size images
            augmented on the device: workers would only copy them) and ``min(8, usable CPUs)`` for file sources
            (ImageFolder: decoding and cropping on the CPU is the bottleneck).
        image_size: Side of the square images the model sees.
        test_resize: Evaluation resize: ``"resize"`` (``Resize(image_size)``, the reference's CIFAR-100 test transform)
            or ``"resize_center_crop"`` (``Resize(image_size / crop_pct) + CenterCrop(image_size)``, ImageNet-R's).
        crop_pct: Centre-crop fraction of ``"resize_center_crop"`` (0.875: 224 of 256).
        crop_scale: RandomResizedCrop area range of training images.
        crop_ratio: RandomResizedCrop aspect-ratio range of training images.
        hflip: Probability of a horizontal flip of a training image.
        drop_last: Drop the last incomplete training batch.
        pin_memory: Pin host memory of batches; ``None``: when CUDA is available.
        persistent_workers: Keep workers alive between iterations of one loader. Off by default: the loaders are
            rebuilt every epoch (the task sequence), so each loader is iterated once and persistence saves nothing.
        predict_root: Folder of images (searched recursively) served by `predict_dataloader` for ``cdl predict``.
        device_data: Serve a fixed-size source's training and evaluation batches from one uint8 copy of each split on
            the training device (`DeviceLoader`: indexed there in the same order, same batches, bitwise the same
            results and resume; no worker processes, no host-to-device copies). ``None``: on when training on CUDA
            with a fixed-size source whose split takes at most a quarter of the GPU's memory. File sources never.
        cuda_graphs: Replay the device augmentation of a fixed-size source's full training batches (uint8 to float,
            `RandomResizedCropFlip`: a few dozen small kernels) from a CUDA graph, one launch per batch instead of
            one per kernel (captured at the second full batch; the first runs eagerly). Bitwise the same batches: the
            graph draws from the device's default generator as the eager kernels do (a resumed run restores that
            generator, `RNGStateCallback`). A smaller last batch runs eagerly, and so does every batch after a
            failed capture (with a warning). Only on CUDA; ``False``: always eager.

    Raises:
        ValueError: Class order not a permutation, classes not splittable into the tasks, bad sizes.
        FileNotFoundError: ``predict_root`` missing or without images (source paths are checked by the source).
    """

    def __init__(
        self,
        source: DataSource | None = None,
        num_tasks: int = 5,
        first_task_classes: int | None = None,
        class_order: Literal["natural", "random"] | list[int | str] = "natural",
        seed: int = 0,
        epochs_per_task: int = 1,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int | None = None,
        image_size: int = 224,
        test_resize: Literal["resize", "resize_center_crop"] = "resize",
        crop_pct: float = 0.875,
        crop_scale: tuple[float, float] = (0.08, 1.0),
        crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        drop_last: bool = False,
        pin_memory: bool | None = None,
        persistent_workers: bool = False,
        predict_root: str | None = None,
        device_data: bool | None = None,
        cuda_graphs: bool = True,
    ) -> None:
        super().__init__()
        for name, value in (
            ("epochs_per_task", epochs_per_task),
            ("batch_size", batch_size),
            ("image_size", image_size),
        ):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if eval_batch_size is not None and eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be >= 1, got {eval_batch_size}")
        if num_workers is not None and num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.source = SyntheticShapes() if source is None else source
        if not isinstance(self.source, DataSource):
            raise TypeError(f"source must be a DataSource, got {type(self.source).__name__}")
        self.num_classes = int(self.source.num_classes)
        self.num_tasks = num_tasks
        self.first_task_classes = first_task_classes
        self.task_sizes = split_task_sizes(self.num_classes, num_tasks, first_task_classes)
        self.class_order_mode = class_order if isinstance(class_order, str) else "explicit"
        self.class_order = resolve_class_order(
            self.num_classes, class_order, seed, self.source.class_names, getattr(self.source, "class_ids", None)
        )
        self.class_names = [str(self.source.class_names[c]) for c in self.class_order]
        self.seed = seed
        self.epochs_per_task = epochs_per_task
        self.task_schedule = TaskSchedule(self.task_sizes, epochs_per_task, self.class_order, self.class_names)
        """The task sequence (sizes, class order and names, epochs per task) that the CLI links into the model."""
        self.task_offsets = list(self.task_schedule.offsets[:-1])  # first label of each task (the schedule's)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        if num_workers is None:  # auto: file sources decode on the CPU, in-memory sources need no worker
            num_workers = 0 if self.source.fixed_size else min(8, _cpu_count())
        self.num_workers = num_workers
        self.image_size = image_size
        self.test_resize = test_resize
        self.crop_pct = crop_pct
        self.drop_last = drop_last
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.train_augment = RandomResizedCropFlip(image_size, crop_scale, crop_ratio, hflip)
        self.eval_resize = EvalResize(image_size, test_resize, crop_pct)
        self.train_crop = TrainCrop(image_size, crop_scale, crop_ratio, hflip)
        self.eval_crop = EvalCrop(image_size, test_resize, crop_pct)
        self.predict_root = predict_root
        self.predict_paths: list[str] = []
        if predict_root is not None:
            root = Path(predict_root).expanduser()
            if not root.is_dir():
                raise FileNotFoundError(f"predict_root {root} does not exist or is not a folder of images")
            self.predict_paths = list_images(root)[0]
            if not self.predict_paths:
                raise FileNotFoundError(f"predict_root {root} holds no image file")
        self._targets: dict[str, np.ndarray] = {}
        self._datasets: dict[tuple[str, tuple[int, ...]], TaskDataset] = {}
        self._summary_logged = False
        self.device_data = device_data
        self._device_images: dict[str, DeviceImages] = {}
        self.cuda_graphs = cuda_graphs
        self._train_batch_graphs: GraphedFunction | None = None  # built at the first CUDA batch

    # ----------------------------------------------------------------------------------------------- task bookkeeping
    @property
    def current_task(self) -> int:
        """Task of the trainer's epoch, ``task_schedule.task_of(epoch)`` (0 without a trainer).

        During ``fit`` the epoch is ``current_epoch``; outside it (``cdl validate --ckpt_path ...``) the last epoch
        trained, by this trainer or by the checkpoint it evaluates (`cdl_lightning.progress.evaluated_epoch`).
        """
        return self.task_schedule.task_of(evaluated_epoch(self.trainer)) if self.trainer is not None else 0

    def task_classes(self, task: int) -> range:
        """Remapped labels of ``task``."""
        return self.task_schedule.classes(task)

    def targets(self, split: Split) -> np.ndarray:
        """Remapped label of every sample of the source's ``split`` (source order; reads labels, no images)."""
        if split not in self._targets:
            labels = np.asarray(self.source.labels(split), dtype=np.int64)
            if len(labels) and (labels.min() < 0 or labels.max() >= self.num_classes):
                raise ValueError(f"{self.source!r}: {split} labels fall outside [0, {self.num_classes})")
            self._targets[split] = remap_labels(labels, self.class_order)
        return self._targets[split]

    def task_dataset(self, split: Split, tasks: int | list[int] | tuple[int, ...]) -> TaskDataset:
        """Samples of ``split`` whose class belongs to ``tasks``; cached.

        Samples are interleaved by class (`interleave_classes`: the first sample of every class, then the second, ...),
        so any prefix of an evaluation loader (``limit_val_batches``) covers every class of every task evenly.
        """
        tasks = (tasks,) if isinstance(tasks, int) else tuple(tasks)
        key = (split, tasks)
        if key not in self._datasets:
            targets = self.targets(split)
            indices = task_sample_indices(targets, self.task_sizes, list(tasks))
            indices = indices[interleave_classes(targets[indices])]
            transform = None
            if not self.source.fixed_size:
                transform = self.train_crop if split == "train" else self.eval_crop
            self._datasets[key] = TaskDataset(
                self.source.dataset(split),
                indices,
                targets[indices],
                task_of_labels(targets[indices], self.task_sizes),
                transform=transform,
                seed=self.seed,
            )
        return self._datasets[key]

    # ------------------------------------------------------------------------------------------------- Lightning hooks
    @override
    def prepare_data(self) -> None:
        self.source.prepare()

    @override
    def setup(self, stage: str) -> None:
        if not self._summary_logged and stage != "predict":
            self.check_tasks()
            rank_zero_info(self.summary())
            self._summary_logged = True

    @override
    def train_dataloader(self) -> ResumableDataLoader | ResumableDeviceLoader:
        """Training data of the current task, shuffled per ``(seed, epoch)``, resumable mid-epoch, sharded under DDP."""
        epoch, (world_size, rank) = self._epoch(), self._world()
        dataset = self.task_dataset("train", self.current_task).with_epoch(epoch)
        sampler = ResumableSampler(len(dataset), self.seed, epoch, world_size, rank, shuffle=True)
        images = self._on_device("train", dataset)
        if images is not None:
            return ResumableDeviceLoader(images, dataset, sampler, self.batch_size, self.drop_last)
        return ResumableDataLoader(
            dataset,
            sampler,
            batch_size=self.batch_size,
            drop_last=self.drop_last,
            generator=torch.Generator().manual_seed(derive_seed(self.seed, epoch, rank, 1)),
            **self._loader_kwargs(),
        )

    @override
    def val_dataloader(self) -> DataLoader:
        """Test data of every seen task ``0..current_task`` (each sample with its task id); exact under DDP."""
        return self._eval_loader(self.task_dataset("test", list(range(self.current_task + 1))))

    @override
    def test_dataloader(self) -> DataLoader:
        """Test data of every task."""
        return self._eval_loader(self.task_dataset("test", list(range(self.num_tasks))))

    @override
    def predict_dataloader(self) -> DataLoader:
        """Images of ``predict_root``: batches ``(uint8 images B x 3 x S x S, int64 index into predict_paths)``."""
        if not self.predict_paths:
            raise ValueError("set data.predict_root to a folder of images to predict")
        # One eval transform: fixed-size sources resize predict images exactly as their validation batches.
        fixed = self.source.fixed_size
        return DataLoader(
            PredictDataset(self.predict_paths, None if fixed else self.eval_crop),
            batch_size=self.eval_batch_size,
            shuffle=False,
            collate_fn=PredictCollate(self.eval_resize) if fixed else None,
            **self._loader_kwargs(),
        )

    @override
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """On the device: uint8 -> float [0, 1]; train batches augmented, eval batches resized (see `preprocess`)."""
        trainer = self.trainer
        if trainer is not None and trainer.predicting:
            images, index = batch  # float images were resized by PredictCollate already (mixed sizes)
            return (images if images.is_floating_point() else self.preprocess(images, train=False)), index
        images, targets, task_ids = batch
        return self.preprocess(images, train=trainer is not None and trainer.training), targets, task_ids

    def preprocess(self, images: Tensor, train: bool) -> Tensor:
        """uint8 ``B x 3 x H x W`` -> float32 [0, 1] ``B x 3 x image_size x image_size``.

        Fixed-size sources: `RandomResizedCropFlip` when ``train`` else `EvalResize` (skipped when the size already
        matches in ``"resize"`` mode). File sources arrive cropped by the CPU transforms: dtype conversion only.
        """
        if train and self._graphable(images):
            if self._train_batch_graphs is None:
                self._train_batch_graphs = GraphedFunction(self._train_batch, max_graphs=1)
            with torch.no_grad():
                return self._train_batch_graphs(images)[0]
        x = _to_float(images)
        if not self.source.fixed_size:
            return x
        return self.train_augment(x) if train else self.eval_resize(x)

    def _graphable(self, images: Tensor) -> bool:
        """Whether a training batch is augmented from a CUDA graph (``cuda_graphs``, a fixed-size source, on CUDA, a
        full batch)."""
        return self.cuda_graphs and self.source.fixed_size and images.is_cuda and images.shape[0] == self.batch_size

    def _train_batch(self, images: Tensor) -> tuple[Tensor]:
        return (self.train_augment(_to_float(images)),)

    def __getstate__(self) -> dict[str, Any]:
        """Pickled/deep-copied (``ddp_spawn``, a notebook's ``copy.deepcopy``) without the training batches' CUDA
        graph: graphs and streams cannot be pickled; a copy captures its own at its first CUDA batches."""
        return {**self.__dict__, "_train_batch_graphs": None}

    @override
    def state_dict(self) -> dict[str, Any]:
        """The task split (plain ints and the class names), checked on resume so a checkpoint is not continued on
        another split or another class selection."""
        return {"num_classes": self.num_classes, "task_sizes": list(self.task_sizes), "class_order": self.class_order,
                "class_names": list(self.class_names)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for key, value in self.state_dict().items():
            if key in state_dict and list(np.atleast_1d(state_dict[key])) != list(np.atleast_1d(value)):
                raise ValueError(
                    f"the checkpoint was written with data {key}={_short(state_dict[key])}, this run has "
                    f"{_short(value)}; resume with the same source, classes, num_tasks, first_task_classes, "
                    "class_order and seed"
                )

    def check_tasks(self) -> None:
        """Raise before any compute when a task has no training or no test sample (e.g. a class folder left empty),
        naming the task and its classes without samples; called by `setup`."""
        problems = []
        for split in ("train", "test"):
            counts = np.bincount(self.targets(split), minlength=self.num_classes)
            for t in range(self.num_tasks):
                classes = self.task_classes(t)
                if counts[classes.start : classes.stop].sum() == 0:
                    names = self.class_names[classes.start : classes.stop][:5]
                    problems.append(f"task {t} has no {split} image (classes {names})")
        if problems:
            raise ValueError(
                f"{self.source!r}: " + "; ".join(problems) + ". Every task needs training and test images: add "
                "images, or leave those classes out with the source's `classes`."
            )

    # ------------------------------------------------------------------------------------------- facts for the others
    def trainer_kwargs(self) -> dict[str, Any]:
        """``Trainer`` arguments the task loop needs (what the CLI links): ``Trainer(**dm.trainer_kwargs(), ...)``."""
        return {
            "max_epochs": self.num_tasks * self.epochs_per_task,
            "check_val_every_n_epoch": self.epochs_per_task,
            "reload_dataloaders_every_n_epochs": 1,
            "num_sanity_val_steps": 0,
        }

    def model_kwargs(self) -> dict[str, Any]:
        """The data facts a learner takes (what the CLI links): ``PromptLearner(**dm.model_kwargs(), ...)``."""
        return {"task_schedule": self.task_schedule}

    # ---------------------------------------------------------------------------------------------------- reporting
    def summary(self) -> str:
        """One line per task: classes and sample counts (reads labels, not images)."""
        lines = [
            f"{type(self.source).__name__}: {self.num_classes} classes in {self.num_tasks} tasks {self.task_sizes}, "
            f"class order {self.class_order_mode} (seed {self.seed}), {self.epochs_per_task} epoch(s) per task, "
            f"image {self.image_size}px ({'device' if self.source.fixed_size else 'CPU'} augmentation)"
        ]
        train, test = self.targets("train"), self.targets("test")
        task_train, task_test = task_of_labels(train, self.task_sizes), task_of_labels(test, self.task_sizes)
        for t in range(self.num_tasks):
            start, stop = self.task_schedule.task_range(t)
            names = [n.split(",")[0] for n in self.class_names[start:stop]]
            shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
            lines.append(
                f"  task {t}: classes [{start}, {stop}) "
                f"train {int((task_train == t).sum())} test {int((task_test == t).sum())}  ({shown})"
            )
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(source={self.source!r}, num_tasks={self.num_tasks}, task_sizes={self.task_sizes}, "
            f"class_order={self.class_order_mode!r}, seed={self.seed}, epochs_per_task={self.epochs_per_task}, "
            f"batch_size={self.batch_size}, image_size={self.image_size}, test_resize={self.test_resize!r})"
        )

    def __str__(self) -> str:  # LightningDataModule.__str__ would build every dataloader
        return repr(self)

    # -------------------------------------------------------------------------------------------------------- helpers
    def _epoch(self) -> int:
        return int(self.trainer.current_epoch) if self.trainer is not None else 0

    def _world(self) -> tuple[int, int]:
        if self.trainer is None:
            return 1, 0
        return int(self.trainer.world_size), int(self.trainer.global_rank)

    def _on_device(self, split: Split, dataset: Any) -> DeviceImages | None:
        """The split's images on the training device when ``device_data`` applies (see the argument), else None."""
        strategy = getattr(self.trainer, "strategy", None)  # (None also for a stand-in trainer without one)
        if self.device_data is False or not self.source.fixed_size or strategy is None:
            return None
        device = strategy.root_device
        if self.device_data is None:
            if device.type != "cuda" or not isinstance(dataset.base, ArrayDataset):
                return None
            if device_bytes(dataset) * 4 > torch.cuda.get_device_properties(device).total_memory:
                return None
        if split not in self._device_images or self._device_images[split].device != device:
            self._device_images[split] = DeviceImages(dataset.base, device)
        return self._device_images[split]

    def _loader_kwargs(self) -> dict[str, Any]:
        return {
            "num_workers": self.num_workers,
            "pin_memory": self.pin_memory,
            "persistent_workers": self.persistent_workers,
        }

    def _eval_loader(self, dataset: Dataset) -> DataLoader:
        world_size, rank = self._world()
        sampler = None
        if world_size > 1:
            sampler = UnrepeatedDistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=False)
        images = self._on_device("test", dataset)
        if images is not None:
            return DeviceLoader(images, dataset, sampler or SequentialSampler(dataset), self.eval_batch_size)
        return DataLoader(
            dataset,
            batch_size=self.eval_batch_size,
            shuffle=False,
            sampler=sampler,
            generator=torch.Generator().manual_seed(derive_seed(self.seed, rank, 2)),
            **self._loader_kwargs(),
        )


def _short(value: Any, limit: int = 10) -> str:
    values = list(np.atleast_1d(value))
    return str(values[:limit])[:-1] + (", ...]" if len(values) > limit else "]")
