"""`NpzSource`: a data set stored in one ``.npz`` file, as decoded arrays or as encoded image bytes (a "pack")."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tempfile
import warnings
import zipfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import PIL
from PIL import Image

from cdl_lightning.data.folder import to_rgb
from cdl_lightning.data.source import ArraySource, Split, check_labels
from cdl_lightning.data.splits import ClassSelection

__all__ = ["NpzSource", "decode_cache_dir", "decode_images", "images_to_nchw"]

# Decoded packs, shared by every NpzSource of the process: {(path, mtime, split): (images, labels)}.
_DECODED: dict[tuple[str, float, str], tuple[np.ndarray, np.ndarray]] = {}

_FORMAT = (
    "expected an .npz with, per split (train, and test or val), either {split}_images (uint8 N x H x W, "
    "N x H x W x 1|3 or N x 1|3 x H x W) + {split}_labels, or the pack arrays {split}_bytes + {split}_offsets + "
    "{split}_labels (write one with `cdl pack`)"
)


class NpzSource(ArraySource):
    """Images and labels in an ``.npz`` file (plain ``numpy.load``, no pickle); two layouts per split:

    - decoded: ``{split}_images`` uint8 ``N x H x W`` (grayscale), ``N x H x W x C`` or ``N x C x H x W`` with
      ``C`` 1 or 3, and ``{split}_labels``; grayscale is repeated to the 3 channels a ViT takes;
    - encoded (the pack format of ``shared/data/README.md``, written by `cdl_lightning.data.pack`): ``{split}_bytes``
      (every encoded image back to back), ``{split}_offsets`` (int64, N + 1) and ``{split}_labels``. Decoded once per
      process (about 80 us per 32 px WebP image on one core) and cached; all images must have one size; any mode
      (grayscale, palette, RGBA, CMYK) is converted to RGB.

    Splits: ``train`` and ``test``; a file without ``test`` but with ``val`` uses ``val`` as the test split (the packs'
    ``val`` is the labelled Tiny-ImageNet validation set). Class names come from ``names`` (or ``class_names``, else
    ``wnids``), else ``"0", "1", ...``; the number of classes is their count, or ``max(label) + 1``.

    Construction checks, without reading the images: every split's arrays exist, image / offset and label counts agree,
    image arrays are uint8 of a supported shape, labels are integers that index the class names.

    Decoded images of an encoded split are also cached on disk (``decode_cache``), keyed by a hash of the encoded
    bytes: the next process that reads the same images (the next run of a sweep, another DDP rank, a resumed run)
    loads a ``.npy`` instead of decoding again. Same arrays, bit for bit; delete the folder to reclaim the space.

    Args:
        path: The ``.npz`` file.
        decode_workers: Processes used to decode an encoded split (0: decode in this process).
        decode_cache: Folder of the decoded-image cache: ``"auto"`` = ``$CDL_CACHE_DIR/decoded`` or
            ``~/.cache/cdl-lightning/decoded``; ``None`` = no disk cache. Splits whose decoded images exceed
            ``decode_cache_max_gb`` are not cached; a cache that cannot be written warns once and is skipped.
        decode_cache_max_gb: Largest decoded split (GiB) written to the cache.
        classes: Keep only these classes: names, wnids (when the file has ``wnids``), the part of a name before its
            first comma (``goldfish``) when unique, or indices; or a seeded random subset
            (``{random: 20, seed: 0}``, ``{seed: 0, start: 102, stop: 202}``); see
            `cdl_lightning.data.splits.select_classes`. ``None``: all.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: The file lacks the arrays of a split, or they disagree (the message names the file and split).
    """

    def __init__(
        self,
        path: str,
        decode_workers: int = 0,
        classes: ClassSelection | None = None,
        decode_cache: str | None = "auto",
        decode_cache_max_gb: float = 4.0,
    ) -> None:
        self.path = str(path)
        self.decode_workers = decode_workers
        self.classes = classes
        self.decode_cache = decode_cache
        self.decode_cache_max_gb = decode_cache_max_gb
        file = Path(self.path).expanduser()
        if not file.is_file():
            raise FileNotFoundError(f"NpzSource: {file} does not exist; " + _FORMAT)
        try:
            z = np.load(file)
        except (OSError, ValueError, zipfile.BadZipFile) as error:
            raise ValueError(f"NpzSource: {file} is not a readable .npz ({error}); " + _FORMAT) from error
        with z:
            keys = set(z.files)
            self._splits = {"train": "train", "test": "test" if _has_split(keys, "test") else "val"}
            for split, stored in self._splits.items():
                if not _has_split(keys, stored):
                    wanted = "test or val" if split == "test" else "train"
                    raise ValueError(
                        f"NpzSource: {file} has no {wanted} split: need {stored}_labels with {stored}_images or "
                        f"{stored}_bytes + {stored}_offsets (found keys: {sorted(keys)}); " + _FORMAT
                    )
            names_key = next((k for k in ("names", "class_names", "wnids") if k in keys), None)
            names = [str(n) for n in z[names_key]] if names_key else None
            ids = [str(n) for n in z["wnids"]] if "wnids" in keys and names_key != "wnids" else None
            self.meta = json.loads(str(z["meta"])) if "meta" in keys else {}
            raw_labels = {s: z[f"{stored}_labels"] for s, stored in self._splits.items()}
            self._image_shapes = {s: _check_split(z, file, stored, len(raw_labels[s])) for s, stored in
                                  self._splits.items()}
        if names is not None and len(set(names)) != len(names):
            raise ValueError(f"NpzSource: {file}: the class names in '{names_key}' are not unique")
        num_classes = len(names) if names else None
        if num_classes is None:
            num_classes = 1 + max(int(np.max(lab, initial=-1)) for lab in raw_labels.values())
            num_classes = max(num_classes, 1)
        self._labels_by_split = {
            s: check_labels(lab, num_classes, f"NpzSource: {file} split {self._splits[s]!r}")
            for s, lab in raw_labels.items()
        }
        self.class_names = names or [str(i) for i in range(num_classes)]
        self.class_ids = ids if ids is not None and len(ids) == len(self.class_names) else None
        self.select(classes)

    def _labels(self, split: Split) -> np.ndarray:
        return self._labels_by_split[split]

    def _load(self, split: Split) -> tuple[np.ndarray, np.ndarray]:
        file = Path(self.path).expanduser().resolve()
        stored = self._splits[split]
        key = (str(file), file.stat().st_mtime, stored)
        if key not in _DECODED:
            with np.load(file) as z:
                if f"{stored}_images" in z.files:
                    images = images_to_nchw(z[f"{stored}_images"], f"NpzSource: {file} {stored}_images")
                else:
                    images = self._decode(z[f"{stored}_bytes"], z[f"{stored}_offsets"], f"{file} split {stored!r}")
            if len(images) != len(self._labels_by_split[split]):  # the file changed since construction
                raise ValueError(f"NpzSource: {file} split {stored!r}: {len(images)} images but "
                                 f"{len(self._labels_by_split[split])} labels")
            _DECODED[key] = (np.ascontiguousarray(images), self._labels_by_split[split])
        return _DECODED[key]

    def arrays(self, split: Split) -> tuple[np.ndarray, np.ndarray]:
        """As `ArraySource.arrays`; with a class selection, an encoded split decodes only the kept images."""
        cache = self.__dict__.setdefault("_array_cache", {})
        keep = self.sample_indices(split) if split in self._splits else None
        if split not in cache and keep is not None:
            file = Path(self.path).expanduser()
            stored = self._splits[split]
            with np.load(file) as z:
                if f"{stored}_bytes" in z.files:
                    data, offsets = z[f"{stored}_bytes"], z[f"{stored}_offsets"]
                    starts, ends = offsets[keep], offsets[keep + 1]
                    kept = np.concatenate([data[a:b] for a, b in zip(starts, ends)]) if len(keep) else data[:0]
                    kept_offsets = np.concatenate([[0], np.cumsum(ends - starts)]).astype(np.int64)
                    images = self._decode(kept, kept_offsets, f"{file} split {stored!r}")
                    cache[split] = (np.ascontiguousarray(images), self.labels(split))
        return super().arrays(split)

    def _decode(self, data: np.ndarray, offsets: np.ndarray, where: str) -> np.ndarray:
        """`decode_images`, through the disk cache when there is one."""
        folder = decode_cache_dir(self.decode_cache)
        if folder is None:
            return decode_images(data, offsets, self.decode_workers, where)
        digest = hashlib.blake2b(digest_size=20)
        # the decoder's version too: another Pillow (libwebp, libjpeg) may decode the same bytes differently
        digest.update(f"cdl-decoded-v1 Pillow {PIL.__version__} {len(offsets)}".encode())
        digest.update(np.ascontiguousarray(offsets, dtype=np.int64).tobytes())
        digest.update(memoryview(np.ascontiguousarray(data)))
        file = folder / f"{digest.hexdigest()}.npy"
        n = len(offsets) - 1
        try:
            cached = np.load(file, allow_pickle=False)
            if cached.dtype == np.uint8 and cached.ndim == 4 and cached.shape[0] == n and cached.shape[1] == 3:
                return cached
        except (OSError, ValueError, EOFError):  # absent, or a file cut short: decode (and rewrite) it
            pass
        images = decode_images(data, offsets, self.decode_workers, where)
        if images.nbytes <= self.decode_cache_max_gb * 2**30:
            _write_atomically(file, images)
        return images

    def __repr__(self) -> str:
        counts = {s: len(self.labels(s)) for s in ("train", "test")}
        return (
            f"NpzSource(path={self.path!r}, classes={self.num_classes}, train={counts['train']}, test={counts['test']}"
            f"{' (val)' if self._splits['test'] == 'val' else ''}{self._selection_repr()})"
        )


_CACHE_WARNED: set[str] = set()


def decode_cache_dir(setting: str | None = "auto") -> Path | None:
    """The decoded-image cache folder of an `NpzSource` ``decode_cache`` setting (``"auto"``: ``$CDL_CACHE_DIR/decoded``
    or ``~/.cache/cdl-lightning/decoded``; ``None``: no cache)."""
    if setting is None or setting == "":
        return None
    if setting == "auto":
        root = os.environ.get("CDL_CACHE_DIR")
        if root:
            return Path(root).expanduser() / "decoded"
        try:
            return Path.home() / ".cache" / "cdl-lightning" / "decoded"
        except RuntimeError:  # no HOME and a user without a passwd entry (some containers): no cache
            if "home" not in _CACHE_WARNED:
                _CACHE_WARNED.add("home")
                warnings.warn("NpzSource: no home directory for the decoded-image cache; decoding without it (set "
                              "CDL_CACHE_DIR or decode_cache to a writable folder)", stacklevel=4)
            return None
    return Path(setting).expanduser()


def _write_atomically(file: Path, images: np.ndarray) -> None:
    """Save ``images`` as ``file`` via a temporary file in the same folder (a reader never sees half a file; two
    writers of the same images both succeed). A folder that cannot be written warns once and is left alone."""
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=file.parent, prefix=".tmp-", suffix=".npy", delete=False) as handle:
            np.save(handle, images, allow_pickle=False)
        os.chmod(handle.name, 0o644)  # like any cache file, not the temporary file's 0600
        os.replace(handle.name, file)
    except OSError as error:
        with contextlib.suppress(OSError, NameError):
            os.unlink(handle.name)
        if str(file.parent) not in _CACHE_WARNED:
            _CACHE_WARNED.add(str(file.parent))
            warnings.warn(f"NpzSource: cannot write the decoded-image cache in {file.parent} ({error}); decoding "
                          "without it (set decode_cache to a writable folder, or null to silence this)", stacklevel=3)


def images_to_nchw(images: np.ndarray, where: str = "images") -> np.ndarray:
    """A uint8 image array as ``N x 3 x H x W``: accepts ``N x H x W`` (grayscale), ``N x H x W x C`` and
    ``N x C x H x W`` with ``C`` in {1, 3}; one channel is repeated three times."""
    _check_image_array(images.shape, images.dtype, where)
    if images.ndim == 3:
        images = images[:, None]
    elif images.shape[1] not in (1, 3):  # channels last (the checked shape has 1 or 3 there)
        images = images.transpose(0, 3, 1, 2)
    if images.shape[1] == 1:
        images = np.repeat(images, 3, axis=1)
    return images


def _check_image_array(shape: tuple[int, ...], dtype: np.dtype, where: str) -> None:
    fix = "store uint8 N x H x W (grayscale), N x H x W x 3 or N x 3 x H x W (e.g. via `cdl pack`)"
    if np.dtype(dtype) != np.uint8:
        extra = " (scale floats in [0, 1] by 255 and cast)" if np.issubdtype(dtype, np.floating) else ""
        raise ValueError(f"{where}: images must be uint8, got {np.dtype(dtype)}{extra}; {fix}")
    if len(shape) == 3:
        return
    if len(shape) != 4 or (shape[-1] not in (1, 3) and shape[1] not in (1, 3)):
        extra = " (4 channels: drop the alpha channel first)" if len(shape) == 4 and 4 in (shape[1], shape[-1]) else ""
        raise ValueError(f"{where}: unsupported image array shape {tuple(shape)}{extra}; {fix}")


def _npy_header(z: np.lib.npyio.NpzFile, key: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of array ``key`` of an open npz, read from its header (no data loaded)."""
    with z.zip.open(f"{key}.npy") as handle:
        version = np.lib.format.read_magic(handle)
        reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = reader(handle)
    return tuple(shape), dtype


def _check_split(z: np.lib.npyio.NpzFile, file: Path, split: str, num_labels: int) -> tuple[int, ...] | None:
    """Check a split's image arrays against its label count; returns the image array's shape (decoded layout)."""
    where = f"NpzSource: {file} split {split!r}"
    if f"{split}_images" in z.files:
        shape, dtype = _npy_header(z, f"{split}_images")
        _check_image_array(shape, dtype, f"{where} ({split}_images)")
        if shape[0] != num_labels:
            raise ValueError(f"{where}: {shape[0]} images ({split}_images) but {num_labels} labels ({split}_labels)")
        return shape
    offsets = z[f"{split}_offsets"]
    (num_bytes,), _ = _npy_header(z, f"{split}_bytes")
    if offsets.ndim != 1 or len(offsets) != num_labels + 1:
        raise ValueError(
            f"{where}: {split}_offsets has {len(offsets)} entries, so {len(offsets) - 1} images, but {split}_labels "
            f"has {num_labels} labels (offsets need N + 1 entries for N images)"
        )
    if num_labels and (offsets[0] != 0 or np.any(np.diff(offsets) <= 0) or offsets[-1] != num_bytes):
        raise ValueError(
            f"{where}: {split}_offsets must start at 0, increase strictly and end at len({split}_bytes)={num_bytes} "
            f"(got {offsets[0]} ... {offsets[-1]})"
        )
    return None


def decode_images(data: np.ndarray, offsets: np.ndarray, workers: int = 0, where: str = "images") -> np.ndarray:
    """Decode images stored back to back in ``data`` (bounds in ``offsets``) into uint8 ``N x 3 x H x W``.

    Args:
        data: uint8 array of the encoded files concatenated.
        offsets: int64 array of length N + 1; image i is ``data[offsets[i]:offsets[i + 1]]``.
        workers: Decode in this many processes (0: here).
        where: Names the data in error messages (file and split).

    Raises:
        ValueError: An image cannot be decoded (the message gives its index) or the images differ in size.
    """
    n = len(offsets) - 1
    if n <= 0:
        raise ValueError("no image to decode")
    chunk = 2048
    starts = list(range(0, n, chunk))
    if workers > 0 and n > chunk:
        jobs = [
            (data[offsets[s] : offsets[min(s + chunk, n)]], offsets[s : min(s + chunk, n) + 1] - offsets[s], s, where)
            for s in starts
        ]
        with ProcessPoolExecutor(min(workers, len(jobs), os.cpu_count() or 1)) as pool:
            parts = list(pool.map(_decode_chunk, *zip(*jobs, strict=True)))
    else:
        parts = [_decode_chunk(data, offsets[s : min(s + chunk, n) + 1], s, where) for s in starts]
    shapes = {p.shape[1:] for p in parts}
    if len(shapes) != 1:
        raise ValueError(f"{where}: images of one split must share a size, found {sorted(shapes)} (C x H x W); "
                         "re-pack with `cdl pack --size S`")
    return np.concatenate(parts)


def _decode_chunk(data: np.ndarray, offsets: np.ndarray, first: int = 0, where: str = "images") -> np.ndarray:
    images = []
    for i in range(len(offsets) - 1):
        try:
            with Image.open(io.BytesIO(data[offsets[i] : offsets[i + 1]].tobytes())) as image:
                images.append(np.asarray(to_rgb(image)))
        except (OSError, ValueError, SyntaxError) as error:  # PIL's errors for corrupt or truncated data
            raise ValueError(f"{where}: image {first + i} cannot be decoded ({error}); the pack is corrupt") from error
    if len({im.shape for im in images}) != 1:
        raise ValueError(f"{where}: images of one split must share a size, found {sorted({im.shape for im in images})} "
                         "(H x W x C); re-pack with `cdl pack --size S`")
    return np.stack(images).transpose(0, 3, 1, 2)


def _has_split(keys: set[str], split: str) -> bool:
    return f"{split}_labels" in keys and (
        f"{split}_images" in keys or (f"{split}_bytes" in keys and f"{split}_offsets" in keys)
    )
