"""`NpzSource`: a data set stored in one ``.npz`` file, as decoded arrays or as encoded image bytes (a "pack")."""

from __future__ import annotations

import io
import json
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from cdl_lightning.data.source import ArraySource, Split

__all__ = ["NpzSource", "decode_images"]

# Decoded packs, shared by every NpzSource of the process: {(path, mtime, split): (images, labels)}.
_DECODED: dict[tuple[str, float, str], tuple[np.ndarray, np.ndarray]] = {}


class NpzSource(ArraySource):
    """Images and labels in an ``.npz`` file (plain ``numpy.load``, no pickle); two layouts per split:

    - decoded: ``{split}_images`` uint8 ``N x H x W x 3`` (or ``N x 3 x H x W``) and ``{split}_labels``;
    - encoded (the pack format of ``shared/data/README.md``): ``{split}_bytes`` (every encoded image back to back),
      ``{split}_offsets`` (int64, N + 1) and ``{split}_labels``. Decoded once per process (about 80 us per 32 px WebP
      image on one core) and cached; all images must have one size.

    Splits: ``train`` and ``test``; a file without ``test`` but with ``val`` uses ``val`` as the test split (the packs'
    ``val`` is the labelled Tiny-ImageNet validation set). Class names come from ``names`` (or ``class_names``, else
    ``wnids``), else ``"0", "1", ...``; ``num_classes`` is their count, or ``max(label) + 1``.

    Args:
        path: The ``.npz`` file.
        decode_workers: Processes used to decode an encoded split (0: decode in this process).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: The file lacks the arrays of a split.
    """

    def __init__(self, path: str, decode_workers: int = 0) -> None:
        self.path = str(path)
        self.decode_workers = decode_workers
        file = Path(self.path).expanduser()
        if not file.is_file():
            raise FileNotFoundError(
                f"NpzSource: {file} does not exist (expected an .npz with train_images/train_labels or the pack arrays "
                "train_bytes/train_offsets/train_labels, and the same for test or val)"
            )
        with np.load(file) as z:
            keys = set(z.files)
            self._splits = {"train": "train", "test": "test" if _has_split(keys, "test") else "val"}
            for split, stored in self._splits.items():
                if not _has_split(keys, stored):
                    wanted = "test or val" if split == "test" else "train"
                    raise ValueError(
                        f"NpzSource: {file} has no {wanted} split: need {stored}_labels with {stored}_images or "
                        f"{stored}_bytes + {stored}_offsets (found keys: {sorted(keys)})"
                    )
            self._labels = {s: z[f"{stored}_labels"].astype(np.int64) for s, stored in self._splits.items()}
            names_key = next((k for k in ("names", "class_names", "wnids") if k in keys), None)
            names = [str(n) for n in z[names_key]] if names_key else None
            self.meta = json.loads(str(z["meta"])) if "meta" in keys else {}
        self.num_classes = len(names) if names else int(max(lab.max(initial=-1) for lab in self._labels.values())) + 1
        self.class_names = names or [str(i) for i in range(self.num_classes)]
        for split, labels in self._labels.items():
            if len(labels) and (labels.min() < 0 or labels.max() >= self.num_classes):
                raise ValueError(f"NpzSource: {split} labels of {file} fall outside [0, {self.num_classes})")

    def labels(self, split: Split) -> np.ndarray:
        return self._labels[split]

    def _load(self, split: Split) -> tuple[np.ndarray, np.ndarray]:
        file = Path(self.path).expanduser().resolve()
        stored = self._splits[split]
        key = (str(file), file.stat().st_mtime, stored)
        if key not in _DECODED:
            with np.load(file) as z:
                if f"{stored}_images" in z.files:
                    images = z[f"{stored}_images"]
                    if images.ndim != 4 or 3 not in (images.shape[1], images.shape[3]) or images.dtype != np.uint8:
                        raise ValueError(f"NpzSource: {stored}_images must be uint8 N x H x W x 3, got {images.shape}")
                    if images.shape[3] == 3:
                        images = images.transpose(0, 3, 1, 2)
                else:
                    images = decode_images(z[f"{stored}_bytes"], z[f"{stored}_offsets"], self.decode_workers)
            _DECODED[key] = (np.ascontiguousarray(images), self._labels[split])
        return _DECODED[key]

    def __repr__(self) -> str:
        return f"NpzSource(path={self.path!r}, classes={self.num_classes}, train={len(self._labels['train'])}, " + (
            f"test={len(self._labels['test'])}{' (val)' if self._splits['test'] == 'val' else ''})"
        )


def decode_images(data: np.ndarray, offsets: np.ndarray, workers: int = 0) -> np.ndarray:
    """Decode images stored back to back in ``data`` (bounds in ``offsets``) into uint8 ``N x 3 x H x W``.

    Args:
        data: uint8 array of the encoded files concatenated.
        offsets: int64 array of length N + 1; image i is ``data[offsets[i]:offsets[i + 1]]``.
        workers: Decode in this many processes (0: here).
    """
    n = len(offsets) - 1
    if n <= 0:
        raise ValueError("no image to decode")
    chunk = 2048
    starts = list(range(0, n, chunk))
    if workers > 0 and n > chunk:
        jobs = [
            (data[offsets[s] : offsets[min(s + chunk, n)]], offsets[s : min(s + chunk, n) + 1] - offsets[s])
            for s in starts
        ]
        with ProcessPoolExecutor(min(workers, len(jobs), os.cpu_count() or 1)) as pool:
            parts = list(pool.map(_decode_chunk, *zip(*jobs, strict=True)))
    else:
        parts = [_decode_chunk(data, offsets[s : min(s + chunk, n) + 1]) for s in starts]
    shapes = {p.shape[1:] for p in parts}
    if len(shapes) != 1:
        raise ValueError(f"images of one split must share a size, found {sorted(shapes)}")
    return np.concatenate(parts)


def _decode_chunk(data: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    images = []
    for i in range(len(offsets) - 1):
        with Image.open(io.BytesIO(data[offsets[i] : offsets[i + 1]].tobytes())) as image:
            images.append(np.asarray(image.convert("RGB")))
    if len({im.shape for im in images}) != 1:
        raise ValueError(f"images of one split must share a size, found {sorted({im.shape for im in images})}")
    return np.stack(images).transpose(0, 3, 1, 2)


def _has_split(keys: set[str], split: str) -> bool:
    return f"{split}_labels" in keys and (
        f"{split}_images" in keys or (f"{split}_bytes" in keys and f"{split}_offsets" in keys)
    )
