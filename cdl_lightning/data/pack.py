"""``cdl pack``: write the library's npz pack (encoded images) from an image folder, an npz of arrays, or arrays.

The pack format (read by `NpzSource`, plain ``numpy.load``, no pickle), per split (``train`` and ``test``):
``{split}_bytes`` (uint8: every encoded image back to back), ``{split}_offsets`` (int64, N + 1: image ``i`` is
``bytes[offsets[i]:offsets[i + 1]]``) and ``{split}_labels`` (int16, or int32 beyond 32767 classes); plus ``names``
(str, index = label), ``wnids`` when the classes are WordNet ids (Tiny-ImageNet) and ``meta`` (a JSON string: how the
pack was made). Encoded images keep the file small (Fashion-MNIST: ~1/3 of the raw arrays as PNG) and decode in
about 80 us each.

Python::

    from cdl_lightning.data.pack import pack_arrays, pack_folder
    pack_folder("~/data/my_photos", "my_photos.npz", size=64)       # train/ + val/ (or any ImageFolderSource layout)
    pack_arrays("fmnist.npz", train=(x_train, y_train), test=(x_test, y_test), names=names)  # N x 28 x 28 uint8

Command line::

    cdl pack ~/data/tiny-imagenet-200 tiny.npz --size 32 --format webp --quality 80
    cdl pack ~/data/my_photos photos.npz --size 64 --classes cat dog eel
    cdl pack arrays.npz packed.npz            # an npz of {split}_images / {split}_labels, re-encoded as PNG
    cdl pack tiny-imagenet-32.npz proxy.npz --classes '{seed: 0, start: 102}'   # a class subset of a pack, as is
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from PIL import Image

from cdl_lightning.data.folder import ImageFolderSource, _cpu_count, to_rgb
from cdl_lightning.data.source import check_labels
from cdl_lightning.data.splits import ClassSelection, select_classes

__all__ = ["pack_arrays", "pack_folder", "pack_npz", "encode_image", "resize_center_crop", "write_pack", "main"]

Format = Literal["png", "webp", "jpeg", "original", "auto"]


def encode_image(image: Image.Image, format: str = "png", quality: int = 90) -> bytes:
    """Encode a PIL image: ``"png"`` (lossless), ``"webp"`` (lossy at ``quality``; lossless when ``quality`` is 100)
    or ``"jpeg"`` (at ``quality``). Grayscale images stay one channel (``NpzSource`` repeats it to RGB)."""
    if image.mode not in ("L", "RGB"):
        image = to_rgb(image)
    buffer = io.BytesIO()
    if format == "png":
        image.save(buffer, format="PNG")
    elif format == "webp":
        image.save(buffer, format="WEBP", quality=int(quality), lossless=int(quality) >= 100, method=4)
    elif format == "jpeg":
        image.save(buffer, format="JPEG", quality=int(quality))
    else:
        raise ValueError(f"format must be 'png', 'webp' or 'jpeg' to encode, got {format!r}")
    return buffer.getvalue()


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """Shorter side to ``size`` (bilinear, antialiased), then the central ``size x size`` square."""
    width, height = image.size
    scale = size / min(width, height)
    new = (max(size, round(width * scale)), max(size, round(height * scale)))
    if new != image.size:
        image = image.resize(new, Image.BILINEAR)
    left, top = (new[0] - size) // 2, (new[1] - size) // 2
    return image.crop((left, top, left + size, top + size))


def write_pack(
    out: str | Path,
    splits: dict[str, tuple[list[bytes], np.ndarray]],
    names: Sequence[str],
    meta: dict | None = None,
    wnids: Sequence[str] | None = None,
) -> Path:
    """Write encoded images (``{split: (list of encoded images, labels)}``) and class names as a pack at ``out``."""
    arrays: dict[str, np.ndarray] = {}
    label_dtype = np.int16 if len(names) < 2**15 else np.int32
    for split, (encoded, labels) in splits.items():
        if len(encoded) != len(labels):
            raise ValueError(f"split {split!r}: {len(encoded)} images but {len(labels)} labels")
        if not encoded:
            raise ValueError(f"split {split!r} holds no image")
        sizes = np.fromiter((len(b) for b in encoded), dtype=np.int64, count=len(encoded))
        arrays[f"{split}_bytes"] = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        arrays[f"{split}_offsets"] = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        arrays[f"{split}_labels"] = np.asarray(labels).astype(label_dtype)
    arrays["names"] = np.asarray([str(n) for n in names])
    if wnids is not None:
        arrays["wnids"] = np.asarray([str(w) for w in wnids])
    arrays["meta"] = np.asarray(json.dumps(meta or {}, sort_keys=True))
    path = Path(out).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:  # a file handle: np.savez would append ".npz" to a path without it
        np.savez(handle, **arrays)
    return path


def pack_arrays(
    out: str | Path,
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    names: Sequence[str] | None = None,
    format: Literal["png", "webp", "jpeg"] = "png",
    quality: int = 90,
    classes: ClassSelection | None = None,
    workers: int | None = None,
    meta: dict | None = None,
) -> Path:
    """Pack in-memory images and labels.

    Args:
        out: The ``.npz`` to write.
        train: ``(images, labels)`` of the training split: uint8 images ``N x H x W`` (grayscale), ``N x H x W x C`` or
            ``N x C x H x W`` with ``C`` 1 or 3; integer labels in ``[0, num_classes)``.
        test: The same for the test split.
        names: Class names (index = label); default ``"0", "1", ...`` up to the largest label.
        format: Image encoding (``"png"`` lossless; ``"webp"``/``"jpeg"`` lossy at ``quality``).
        quality: Quality of lossy formats (WebP 100: lossless).
        classes: Pack only these classes (see `select_classes`), relabelled ``0..k-1`` in selection order.
        workers: Encoding threads; ``None``: ``min(8, cpu count)``.
        meta: Extra entries for the pack's ``meta`` JSON.

    Returns:
        The written path.
    """
    splits = {"train": train, "test": test}
    if names is None:
        top = max(int(np.max(np.asarray(lab), initial=-1)) for _, lab in splits.values())
        names = [str(i) for i in range(top + 1)]
    names = [str(n) for n in names]
    keep_classes = select_classes(names, classes)
    new_label = np.arange(len(names))
    if keep_classes is not None:
        new_label = np.full(len(names), -1)
        new_label[keep_classes] = np.arange(len(keep_classes))
    encoded_splits = {}
    start = time.perf_counter()
    for split, (images, labels) in splits.items():
        images = np.asarray(images)
        labels = check_labels(labels, len(names), f"pack_arrays: {split} labels")
        if len(images) != len(labels):
            raise ValueError(f"pack_arrays: {split} has {len(images)} images but {len(labels)} labels")
        images = _to_nhwc(images, f"pack_arrays: {split} images")
        keep = np.flatnonzero(new_label[labels] >= 0)
        encoded = _parallel(lambda i, im=images: encode_image(Image.fromarray(_squeeze(im[i])), format, quality),
                            keep.tolist(), workers)
        encoded_splits[split] = (encoded, new_label[labels[keep]])
    kept_names = names if keep_classes is None else [names[c] for c in keep_classes]
    info = {"created_by": "cdl pack (arrays)", "format": format, "quality": quality,
            "encode_seconds": round(time.perf_counter() - start, 2), **(meta or {})}
    return write_pack(out, encoded_splits, kept_names, info)


def pack_folder(
    root: str | Path,
    out: str | Path,
    format: Format = "auto",
    quality: int = 90,
    size: int | None = None,
    classes: ClassSelection | None = None,
    test_root: str | None = None,
    train_fraction: float = 0.8,
    seed: int = 0,
    skip_corrupt: bool = False,
    workers: int | None = None,
) -> Path:
    """Pack an image folder in any layout `ImageFolderSource` reads: ``train/`` + ``test|val|valid/``,
    Tiny-ImageNet's own (``train/<wnid>/images``, ``val/images`` + ``val_annotations.txt``; class ``names`` from its
    ``words.txt``, ``wnids`` kept), class folders with ``test_root``, or class folders split ``train_fraction`` / rest.

    Args:
        root: The folder.
        out: The ``.npz`` to write.
        format: ``"original"`` stores every file's bytes unchanged (no quality loss; all images must share one size),
            ``"png"``/``"webp"``/``"jpeg"`` re-encode, ``"auto"``: ``"original"`` unless ``size`` asks for a resize,
            then ``"png"``.
        quality: Quality of lossy formats (WebP 100: lossless).
        size: Resize every image (shorter side to ``size``, central square crop); needed when sizes differ.
        classes: Pack only these classes (folder names / indices / seeded subset, see `select_classes`).
        test_root: Separate test tree (see `ImageFolderSource`).
        train_fraction: Per-class train fraction when the folder has no split.
        seed: Seed of that split.
        skip_corrupt: Leave out unreadable files (listed in a warning) instead of failing.
        workers: Threads for checking and encoding; ``None``: ``min(8, cpu count)``.

    Raises:
        ValueError: Images of different sizes without ``size`` (the message shows some sizes), or corrupt files.
    """
    if format == "auto":
        format = "png" if size is not None else "original"
    if format == "original" and size is not None:
        raise ValueError("pack_folder: format 'original' keeps the files unchanged and cannot resize; drop size or "
                         "pick png/webp/jpeg")
    source = ImageFolderSource(str(root), test_root=test_root, train_fraction=train_fraction, seed=seed,
                               classes=classes, verify="decode", skip_corrupt=skip_corrupt, verify_workers=workers)
    start = time.perf_counter()
    if size is None:
        all_paths = [p for split in ("train", "test") for p in source.paths(split)]
        distinct = sorted(set(_parallel(_image_size, all_paths, workers)))
        if len(distinct) > 1:
            raise ValueError(
                f"pack_folder: the images of {root} differ in size ({len(distinct)} sizes, e.g. "
                f"{', '.join(f'{w}x{h}' for w, h in distinct[:4])}); a pack holds one size: give size (`--size S`)"
            )

    def encode(path: str) -> bytes:
        if format == "original":
            return Path(path).read_bytes()
        with Image.open(path) as image:
            image = to_rgb(image) if image.mode not in ("L", "RGB") else image.copy()
        return encode_image(image if size is None else resize_center_crop(image, size), format, quality)

    splits = {}
    for split in ("train", "test"):
        splits[split] = (_parallel(encode, source.paths(split), workers), source.labels(split))
    wnids, names = None, source.class_names
    words = Path(root).expanduser() / "words.txt"
    if source.split_mode == "tiny_imagenet" and words.is_file():
        table = dict(line.split("\t", 1) for line in words.read_text().splitlines() if "\t" in line)
        wnids, names = source.class_names, [table.get(w, w).strip() for w in source.class_names]
    meta = {
        "created_by": "cdl pack (folder)",
        "root": str(root),
        "layout": source.split_mode,
        "format": format,
        "quality": quality if format in ("webp", "jpeg") else None,
        "size": size,
        "classes": None if source.selected_classes is None else source.class_names,
        "skipped_corrupt": source.corrupt_files,
        "encode_seconds": round(time.perf_counter() - start, 2),
    }
    return write_pack(out, splits, names, meta, wnids=wnids)


def pack_npz(
    src: str | Path,
    out: str | Path,
    format: Format = "auto",
    quality: int = 90,
    classes: ClassSelection | None = None,
    workers: int | None = None,
) -> Path:
    """Pack an npz read by `NpzSource`: decoded arrays (``{split}_images``, any supported layout) are encoded as
    `pack_arrays` does; an existing pack is subset by ``classes`` and copied without re-encoding (``format``
    ``"auto"``/``"original"``) or re-encoded (``"png"``/``"webp"``/``"jpeg"``). Names and wnids are kept.

    ``cdl pack tiny-imagenet-32.npz proxy.npz --classes '{seed: 0, start: 102}'`` writes the 100 classes
    ``numpy.random.default_rng(0).permutation(202)[102:]`` (new labels in that order) at half the size.
    """
    from cdl_lightning.data.npz import NpzSource

    source = NpzSource(str(src), classes=classes)
    file = Path(src).expanduser()
    splits: dict[str, tuple[list[bytes], np.ndarray]] = {}
    start = time.perf_counter()
    with np.load(file) as z:
        encoded_input = f"{source._splits['train']}_bytes" in z.files
        for split, stored in source._splits.items():
            labels = source.labels(split)
            keep = source.sample_indices(split)
            if f"{stored}_bytes" in z.files and format in ("auto", "original"):
                data, offsets = z[f"{stored}_bytes"], z[f"{stored}_offsets"]
                indices = np.arange(len(offsets) - 1) if keep is None else keep
                splits[split] = ([data[offsets[i] : offsets[i + 1]].tobytes() for i in indices], labels)
            else:
                fmt = "png" if format in ("auto", "original") else format
                images = source.arrays(split)[0]
                gray = bool(np.array_equal(images[:, 0], images[:, 1]) and np.array_equal(images[:, 0], images[:, 2]))
                planes = images[:, 0] if gray else images.transpose(0, 2, 3, 1)
                splits[split] = (_parallel(lambda i, p=planes, f=fmt: encode_image(Image.fromarray(p[i]), f, quality),
                                           list(range(len(planes))), workers), labels)
    meta = {**source.meta, "created_by": "cdl pack (npz)", "source": str(src),
            "format": format if format not in ("auto",) else ("original" if encoded_input else "png"),
            "classes": None if source.selected_classes is None else source.class_names,
            "encode_seconds": round(time.perf_counter() - start, 2)}
    return write_pack(out, splits, source.class_names, meta, wnids=source.class_ids)


def main(argv: list[str] | None = None) -> None:
    """``cdl pack SRC OUT [options]``."""
    parser = argparse.ArgumentParser(prog="cdl pack", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="an image folder (any ImageFolderSource layout) or an .npz of decoded arrays")
    parser.add_argument("out", help="the .npz pack to write")
    parser.add_argument("--format", choices=("auto", "original", "png", "webp", "jpeg"), default="auto",
                        help="image encoding; auto: folder files unchanged (or png when resizing), png for arrays")
    parser.add_argument("--quality", type=int, default=90, help="quality of webp/jpeg (webp 100: lossless)")
    parser.add_argument("--size", type=int, help="resize: shorter side to SIZE, then central SIZE x SIZE crop")
    parser.add_argument("--classes", nargs="+", metavar="CLASS",
                        help="pack only these classes (names or indices) or one mapping, e.g. '{random: 20, seed: 0}'")
    parser.add_argument("--test-root", help="separate test tree with the same class folders")
    parser.add_argument("--train-fraction", type=float, default=0.8, help="per-class train fraction without a split")
    parser.add_argument("--seed", type=int, default=0, help="seed of that split")
    parser.add_argument("--skip-corrupt", action="store_true",
                        help="leave out unreadable files (listed) instead of failing")
    parser.add_argument("--workers", type=int, help="threads (default: min(8, cpu count))")
    args = parser.parse_args(argv)
    classes: ClassSelection | None = None
    if args.classes:
        parsed = yaml.safe_load(args.classes[0]) if len(args.classes) == 1 else None
        classes = parsed if isinstance(parsed, dict) else [_int_or_name(c) for c in args.classes]
    src = Path(args.src).expanduser()
    start = time.perf_counter()
    if src.is_file() and src.suffix == ".npz":
        path = pack_npz(src, args.out, args.format, args.quality, classes, args.workers)
    elif src.is_dir():
        path = pack_folder(src, args.out, args.format, args.quality, args.size, classes, args.test_root,
                           args.train_fraction, args.seed, args.skip_corrupt, args.workers)
    else:
        parser.error(f"{args.src} is neither an image folder nor an .npz file")
    with np.load(path) as z:
        counts = {s: len(z[f"{s}_labels"]) for s in ("train", "test")}
        num_classes = len(z["names"])
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB): {num_classes} classes, train {counts['train']}, "
          f"test {counts['test']} images ({time.perf_counter() - start:.1f} s)")


def _int_or_name(text: str) -> int | str:
    return int(text) if text.lstrip("-").isdigit() else text


def _to_nhwc(images: np.ndarray, where: str) -> np.ndarray:
    from cdl_lightning.data.npz import _check_image_array

    _check_image_array(images.shape, images.dtype, where)
    if images.ndim == 3:
        return images
    if images.shape[1] in (1, 3) and images.shape[-1] not in (1, 3):
        return images.transpose(0, 2, 3, 1)
    return images


def _squeeze(image: np.ndarray) -> np.ndarray:
    return image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image


def _image_size(path: str) -> tuple[int, int]:
    with Image.open(path) as image:
        return image.size


def _parallel(function: Callable[[Any], Any], items: Sequence[Any], workers: int | None) -> list:
    """``[function(item) for item in items]`` on threads (PIL releases the GIL while coding images)."""
    workers = workers or min(8, _cpu_count())
    if workers <= 1 or len(items) < 64:
        return [function(item) for item in items]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(function, items, chunksize=32))


if __name__ == "__main__":
    main(sys.argv[1:])
