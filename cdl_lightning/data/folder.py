"""`ImageFolderSource`: a tree of class folders of image files (ImageNet-R, Tiny-ImageNet, your own photos)."""

from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from cdl_lightning.data.source import DataSource, Split
from cdl_lightning.data.splits import ClassSelection, split_per_class

__all__ = [
    "ImageFolderSource",
    "FileDataset",
    "IMAGE_EXTENSIONS",
    "SPLIT_FOLDER_NAMES",
    "list_images",
    "find_corrupt_images",
    "to_rgb",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
#: Folder names read as the test split next to ``train/``, in order of preference.
TEST_FOLDER_NAMES = ("test", "val", "valid", "validation")
#: Names that look like a split, not a class: a class folder with one of these names is refused.
SPLIT_FOLDER_NAMES = ("train", "training", *TEST_FOLDER_NAMES)

_LAYOUT = (
    "accepted layouts: (1) {root}/train/<class>/<images> + {root}/test|val|valid|validation/<class>/<images>; "
    "(2) Tiny-ImageNet's own: {root}/train/<wnid>/images/*.JPEG + {root}/val/images + {root}/val/val_annotations.txt; "
    "(3) {root}/<class>/<images> plus test_root=<folder>/<class>/<images>; (4) {root}/<class>/<images> alone, each "
    "class split train_fraction / rest"
)


class ImageFolderSource(DataSource):
    """Images in class subfolders: ImageNet-R (200 classes, ~30k images of varying size), Tiny-ImageNet, your own.

    Where the train/test split comes from, in order of preference:

    1. Tiny-ImageNet's official layout (``root/val/val_annotations.txt`` exists): ``root/train/<wnid>/images`` and
       the labelled ``root/val/images`` (the unlabelled ``root/test`` is ignored);
    2. ``root/train`` and one of ``root/test``, ``root/val``, ``root/valid``, ``root/validation`` (the first present):
       they are the splits (classes are the subfolders of ``root/train``);
    3. ``test_root`` is given: ``root`` is the training tree, ``test_root`` the test tree;
    4. otherwise ``root`` holds every image and each class is split ``train_fraction`` / rest with a seeded
       per-class permutation (`split_per_class`), as the CODA-Prompt reference does for ImageNet-R (80/20).

    A training tree whose class folders are named like splits (``train``, ``val``, ...) is refused, as is a ``train``
    folder without a test folder next to it. Classes are the sorted subfolder names of the training tree (as
    ``torchvision.datasets.ImageFolder``); images may sit in nested folders below a class folder. A test class folder
    unknown to the training tree and an empty class folder are errors. Images of any mode (grayscale, palette, RGBA,
    CMYK, 16-bit) are converted to RGB (`to_rgb`).

    Files are listed and checked in ``__init__`` (``verify``), decoded on access, so a corrupt file is found before
    training starts: an error listing the files, or with ``skip_corrupt`` a warning that counts and lists them and
    leaves them out (their names stay in ``corrupt_files``).

    Args:
        root: The image tree (see above).
        test_root: Separate test tree with the same class folders.
        train_fraction: Fraction of each class used for training when the split is made here.
        seed: Seed of that split.
        classes: Keep only these classes: folder names or indices into the sorted folder names, or a seeded random
            subset (``{random: 20, seed: 0}``); see `cdl_lightning.data.splits.select_classes`. ``None``: all.
        verify: Check of every listed file at construction: ``"header"`` (open it and check its header: finds
            non-images, empty and mislabelled files; ~0.1 ms a file), ``"decode"`` (decode every image fully: finds
            truncated files too, ~1-10 ms a file, on ``verify_workers`` threads) or ``"none"``.
        skip_corrupt: Leave out files that fail the check (with a warning listing them) instead of raising.
        verify_workers: Threads of the check; ``None``: ``min(8, cpu count)``.

    Raises:
        FileNotFoundError: A path is missing or holds no class folder with images (the message shows the layouts).
        ValueError: Class folders named like splits, an empty class folder, unknown test classes, corrupt files.
    """

    fixed_size: ClassVar[bool] = False

    def __init__(
        self,
        root: str,
        test_root: str | None = None,
        train_fraction: float = 0.8,
        seed: int = 0,
        classes: ClassSelection | None = None,
        verify: Literal["header", "decode", "none"] = "header",
        skip_corrupt: bool = False,
        verify_workers: int | None = None,
    ) -> None:
        self.root = str(root)
        self.test_root = None if test_root is None else str(test_root)
        self.train_fraction = train_fraction
        self.seed = seed
        self.classes = classes
        self.verify = verify
        self.skip_corrupt = skip_corrupt
        if verify not in ("header", "decode", "none"):
            raise ValueError(f"ImageFolderSource: verify must be 'header', 'decode' or 'none', got {verify!r}")
        base = Path(self.root).expanduser()
        if not base.is_dir():
            raise FileNotFoundError(f"ImageFolderSource: {base} does not exist or is not a folder; " + _LAYOUT)
        test_dir: Path | None = None
        tiny_annotations = base / "val" / "val_annotations.txt"
        if (base / "train").is_dir() and tiny_annotations.is_file():
            self.split_mode, train_dir = "tiny_imagenet", base / "train"
        elif (base / "train").is_dir() and any((base / n).is_dir() for n in TEST_FOLDER_NAMES):
            name = next(n for n in TEST_FOLDER_NAMES if (base / n).is_dir())
            self.split_mode, train_dir, test_dir = "folders", base / "train", base / name
        elif self.test_root is not None:
            test_dir = Path(self.test_root).expanduser()
            if not test_dir.is_dir():
                raise FileNotFoundError(f"ImageFolderSource: test_root {test_dir} does not exist; " + _LAYOUT)
            self.split_mode, train_dir = "test_root", base
        elif (base / "train").is_dir() and not _class_folders(base, exclude_splits=True):
            raise FileNotFoundError(
                f"ImageFolderSource: {base}/train exists but no test split next to it (looked for "
                f"{', '.join(TEST_FOLDER_NAMES)}); add one, give test_root, or point root at {base}/train to split "
                f"each class train_fraction / rest; " + _LAYOUT
            )
        else:
            self.split_mode, train_dir = "per_class", base

        all_names = _class_folders(train_dir)
        if not all_names:
            raise FileNotFoundError(f"ImageFolderSource: no class folders in {train_dir}; " + _LAYOUT)
        split_like = [n for n in all_names if n.lower() in SPLIT_FOLDER_NAMES]
        if split_like:
            raise ValueError(
                f"ImageFolderSource: the class folders of {train_dir} include {split_like}, which look like split "
                f"names, not classes; " + _LAYOUT
            )
        self.class_names = all_names
        self.select(classes)
        kept = self.selected_classes if self.selected_classes is not None else range(len(all_names))
        class_to_idx = {all_names[c]: c for c in kept}  # stored label = index among all folder names

        paths, labels = list_images(train_dir, class_to_idx)
        _refuse_empty_classes(train_dir, class_to_idx, labels)
        if self.split_mode == "tiny_imagenet":
            test = _tiny_imagenet_val(base / "val", class_to_idx, set(all_names))
            files = {"train": (paths, labels), "test": test}
        elif test_dir is None:
            train_idx, test_idx = split_per_class(labels, train_fraction, seed)
            files = {
                "train": ([paths[i] for i in train_idx], labels[train_idx]),
                "test": ([paths[i] for i in test_idx], labels[test_idx]),
            }
        else:
            known = set(all_names)
            unknown = sorted(n for n in _class_folders(test_dir) if n not in known)
            if unknown:
                raise ValueError(
                    f"ImageFolderSource: test classes {unknown[:5]} of {test_dir} are not class folders of {train_dir}"
                )
            test_classes = {n: i for n, i in class_to_idx.items() if (test_dir / n).is_dir()}
            test_paths, test_labels = list_images(test_dir, test_classes)
            _refuse_empty_classes(test_dir, test_classes, test_labels)
            files = {"train": (paths, labels), "test": (test_paths, test_labels)}

        self.corrupt_files: list[str] = []
        if verify != "none":
            self._files = {s: self._checked(s, *files[s], verify_workers) for s in ("train", "test")}
        else:
            self._files = files

    def _checked(self, split: str, paths: list[str], labels: np.ndarray, workers: int | None) -> tuple:
        bad = find_corrupt_images(paths, full=self.verify == "decode", workers=workers)
        if not bad:
            return paths, labels
        listing = "\n  ".join(f"{p}: {why}" for p, why in list(bad.items())[:20])
        more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
        if not self.skip_corrupt:
            raise ValueError(
                f"ImageFolderSource: {len(bad)} of {len(paths)} {split} files under {self.root} cannot be read as "
                f"images:\n  {listing}{more}\nRemove or replace them, or set skip_corrupt: true to leave them out."
            )
        warnings.warn(
            f"ImageFolderSource: skipping {len(bad)} corrupt {split} file(s) of {len(paths)} (skip_corrupt):\n  "
            f"{listing}{more}",
            stacklevel=3,
        )
        self.corrupt_files += list(bad)
        keep = [i for i, p in enumerate(paths) if p not in bad]
        return [paths[i] for i in keep], labels[keep]

    def _labels(self, split: Split) -> np.ndarray:
        return self._files[split][1]

    def _dataset(self, split: Split) -> FileDataset:
        return FileDataset(*self._files[split])

    def paths(self, split: Split) -> list[str]:
        """File path of every (kept) sample of ``split``, in dataset order."""
        return self._files[split][0]

    def dataset(self, split: Split) -> FileDataset:
        return FileDataset(self.paths(split), self.labels(split))

    def __repr__(self) -> str:
        counts = {s: len(v[1]) for s, v in self._files.items()}
        return (
            f"ImageFolderSource(root={self.root!r}, classes={self.num_classes}, split={self.split_mode}, "
            f"train={counts['train']}, test={counts['test']}{self._selection_repr()})"
        )


class FileDataset(Dataset):
    """Dataset of ``(PIL RGB image, label)`` over a list of files."""

    def __init__(self, paths: list[str], labels: np.ndarray) -> None:
        self.paths = list(paths)
        self.labels = np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return load_rgb(self.paths[index]), int(self.labels[index])


def to_rgb(image: Image.Image) -> Image.Image:
    """An RGB copy of ``image`` whatever its mode: grayscale (``L``, 16-bit ``I;16``/``I``, float ``F``, ``1``),
    palette (with or without transparency), ``LA``/``RGBA`` (alpha dropped, as torchvision's ImageFolder does),
    ``CMYK``, ``YCbCr``. 16-bit and float images are scaled by their maximum value range to 8 bits."""
    if image.mode == "RGB":
        return image.copy() if image.readonly else image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max(initial=0) > 255 else 255.0
        if image.mode == "F" and array.max(initial=0) <= 1.0:
            top = 1.0
        gray = np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")


def load_rgb(path: str) -> Image.Image:
    """Decode an image file to RGB (`to_rgb`); an unreadable file raises an error naming it and the fix."""
    try:
        with Image.open(path) as image:
            return to_rgb(image)
    except (OSError, ValueError, SyntaxError) as error:
        raise OSError(
            f"cannot decode image {path} ({error}); check the folder with ImageFolderSource(verify='decode') and "
            "remove the file or set skip_corrupt: true"
        ) from error


def find_corrupt_images(paths: list[str], full: bool = False, workers: int | None = None) -> dict[str, str]:
    """Files of ``paths`` that PIL cannot read, with the reason: ``{path: error}`` (in ``paths`` order).

    Args:
        paths: Image files.
        full: Decode each image completely (finds truncated data); else open it and check its header (and, for
            PNG, chunk checksums via ``Image.verify``).
        workers: Threads (PIL releases the GIL while decoding); ``None``: ``min(8, cpu count)``.
    """
    def check(path: str) -> str | None:
        try:
            with Image.open(path) as image:
                if full:
                    image.load()
                else:
                    image.verify()
        except Exception as error:  # noqa: BLE001 (any failure to read is what we report)
            return f"{type(error).__name__}: {error}"
        return None

    workers = workers or min(8, _cpu_count())
    if workers <= 1 or len(paths) < 64:
        results = [check(p) for p in paths]
    else:
        with ThreadPoolExecutor(workers) as pool:
            results = list(pool.map(check, paths, chunksize=64))
    return {p: r for p, r in zip(paths, results, strict=True) if r is not None}


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


def _class_folders(folder: Path, exclude_splits: bool = False) -> list[str]:
    names = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
    return [n for n in names if n.lower() not in SPLIT_FOLDER_NAMES] if exclude_splits else names


def _refuse_empty_classes(folder: Path, class_to_idx: dict[str, int], labels: np.ndarray) -> None:
    present = set(np.unique(labels).tolist())
    empty = sorted(name for name, i in class_to_idx.items() if i not in present and (folder / name).is_dir())
    if empty:
        shown = ", ".join(str(folder / n) for n in empty[:5]) + (" ..." if len(empty) > 5 else "")
        raise ValueError(
            f"ImageFolderSource: {len(empty)} class folder(s) hold no image ({', '.join(IMAGE_EXTENSIONS)}): {shown}. "
            "Every class needs images: remove the empty folder(s), or leave the class out with `classes`."
        )


def _tiny_imagenet_val(val_dir: Path, class_to_idx: dict[str, int], known: set[str]) -> tuple[list[str], np.ndarray]:
    """Tiny-ImageNet's labelled validation split: ``val/images/<file>`` labelled by ``val/val_annotations.txt``."""
    paths, labels = [], []
    annotations = val_dir / "val_annotations.txt"
    for number, line in enumerate(annotations.read_text().splitlines(), 1):
        parts = line.split("\t") if "\t" in line else line.split()
        if not parts or not parts[0].strip():
            continue
        if len(parts) < 2:
            raise ValueError(f"ImageFolderSource: {annotations} line {number} is not '<file>\\t<wnid>...': {line!r}")
        name, wnid = parts[0].strip(), parts[1].strip()
        if wnid not in known:
            raise ValueError(f"ImageFolderSource: {annotations} line {number} names {wnid!r}, not a train class folder")
        if wnid not in class_to_idx:
            continue  # left out by `classes`
        path = val_dir / "images" / name
        if not path.is_file():
            raise FileNotFoundError(f"ImageFolderSource: {annotations} line {number} names {path}, which is missing")
        paths.append(str(path))
        labels.append(class_to_idx[wnid])
    order = sorted(range(len(paths)), key=lambda i: (labels[i], paths[i]))
    return [paths[i] for i in order], np.asarray([labels[i] for i in order], dtype=np.int64)


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
