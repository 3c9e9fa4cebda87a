"""`ImageFolderSource`: a tree of class folders of image files (ImageNet-R layout)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from cdl_lightning.data.source import DataSource, Split
from cdl_lightning.data.splits import split_per_class

__all__ = ["ImageFolderSource", "FileDataset", "IMAGE_EXTENSIONS", "list_images"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

_LAYOUT = (
    "expected class subfolders of images, either {root}/<class>/<image> (split per class with train_fraction), "
    "{root}/train/<class>/<image> + {root}/test/<class>/<image>, or a separate test_root with the same classes"
)


class ImageFolderSource(DataSource):
    """Images in class subfolders, e.g. ImageNet-R (200 classes, ~30k images of varying size).

    Where the train/test split comes from, in order of preference:

    1. ``root/train`` and ``root/test`` both exist: they are the splits (classes are the subfolders of ``root/train``);
    2. ``test_root`` is given: ``root`` is the training tree, ``test_root`` the test tree;
    3. otherwise ``root`` holds every image and each class is split ``train_fraction`` / rest with a seeded
       per-class permutation (`split_per_class`), as the CODA-Prompt reference does for ImageNet-R (80/20).

    Classes are the sorted subfolder names of the training tree (as ``torchvision.datasets.ImageFolder``); a test class
    folder unknown to the training tree is an error. Files are only listed in ``__init__``, decoded on access.

    Args:
        root: The image tree (see above).
        test_root: Separate test tree with the same class folders.
        train_fraction: Fraction of each class used for training when the split is made here.
        seed: Seed of that split.

    Raises:
        FileNotFoundError: A path is missing or holds no class folder with images (the message shows the layout).
    """

    fixed_size: ClassVar[bool] = False

    def __init__(self, root: str, test_root: str | None = None, train_fraction: float = 0.8, seed: int = 0) -> None:
        self.root = str(root)
        self.test_root = None if test_root is None else str(test_root)
        self.train_fraction = train_fraction
        self.seed = seed
        base = Path(self.root).expanduser()
        if not base.is_dir():
            raise FileNotFoundError(f"ImageFolderSource: {base} does not exist or is not a folder; " + _LAYOUT)
        if (base / "train").is_dir() and (base / "test").is_dir():
            self.split_mode, train_dir, test_dir = "folders", base / "train", base / "test"
        elif self.test_root is not None:
            test_dir = Path(self.test_root).expanduser()
            if not test_dir.is_dir():
                raise FileNotFoundError(f"ImageFolderSource: test_root {test_dir} does not exist; " + _LAYOUT)
            self.split_mode, train_dir = "test_root", base
        else:
            self.split_mode, train_dir, test_dir = "per_class", base, None

        self.class_names = sorted(e.name for e in os.scandir(train_dir) if e.is_dir() and not e.name.startswith("."))
        if not self.class_names:
            raise FileNotFoundError(f"ImageFolderSource: no class folders in {train_dir}; " + _LAYOUT)
        self.num_classes = len(self.class_names)
        class_to_idx = {name: i for i, name in enumerate(self.class_names)}
        paths, labels = list_images(train_dir, class_to_idx)
        if not paths:
            raise FileNotFoundError(f"ImageFolderSource: no images ({', '.join(IMAGE_EXTENSIONS)}) under {train_dir}")
        if test_dir is None:
            train_idx, test_idx = split_per_class(labels, train_fraction, seed)
            self._files = {
                "train": ([paths[i] for i in train_idx], labels[train_idx]),
                "test": ([paths[i] for i in test_idx], labels[test_idx]),
            }
        else:
            unknown = sorted(
                e.name for e in os.scandir(test_dir) if e.is_dir() and e.name not in class_to_idx and e.name[0] != "."
            )
            if unknown:
                raise ValueError(f"ImageFolderSource: test classes {unknown[:5]} of {test_dir} are not in {train_dir}")
            self._files = {"train": (paths, labels), "test": list_images(test_dir, class_to_idx)}

    def labels(self, split: Split) -> np.ndarray:
        return self._files[split][1]

    def paths(self, split: Split) -> list[str]:
        """File path of every sample of ``split``, in dataset order."""
        return self._files[split][0]

    def dataset(self, split: Split) -> FileDataset:
        return FileDataset(*self._files[split])

    def __repr__(self) -> str:
        counts = {s: len(v[1]) for s, v in self._files.items()}
        return (
            f"ImageFolderSource(root={self.root!r}, classes={self.num_classes}, split={self.split_mode}, "
            f"train={counts['train']}, test={counts['test']})"
        )


class FileDataset(Dataset):
    """Dataset of ``(PIL RGB image, label)`` over a list of files."""

    def __init__(self, paths: list[str], labels: np.ndarray) -> None:
        self.paths = list(paths)
        self.labels = np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        with Image.open(self.paths[index]) as image:
            return image.convert("RGB"), int(self.labels[index])


def list_images(root: str | Path, class_to_idx: dict[str, int] | None = None) -> tuple[list[str], np.ndarray]:
    """Sorted image files under ``root``: with ``class_to_idx``, of ``root/<class>/**`` labelled by class; without it,
    every image under ``root`` (recursively) with label -1."""
    root = Path(root)
    paths: list[str] = []
    labels: list[int] = []
    folders = [(root, -1)] if class_to_idx is None else [(root / c, i) for c, i in sorted(class_to_idx.items())]
    for folder, label in folders:
        if not folder.is_dir():
            continue
        found = []
        for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
            dirnames.sort()
            found += [os.path.join(dirpath, f) for f in filenames if f.lower().endswith(IMAGE_EXTENSIONS)]
        found.sort()
        paths += found
        labels += [label] * len(found)
    return paths, np.asarray(labels, dtype=np.int64)
