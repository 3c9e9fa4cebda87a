"""`cdl pack` / `cdl_lightning.data.pack`: npz packs (encoded images) from arrays, npz arrays and image folders."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cdl_lightning.cli import main
from cdl_lightning.data import NpzSource, pack_arrays, pack_folder


def _fashion_like(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Grayscale 28 x 28 images with a smooth blob per class (compressible, like Fashion-MNIST)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 5
    ys, xs = np.mgrid[0:28, 0:28]
    centres = 6 + 4 * labels
    images = 200 * np.exp(-((xs[None] - centres[:, None, None]) ** 2 + (ys[None] - 14) ** 2) / 30.0)
    return (images + rng.integers(0, 8, images.shape)).astype(np.uint8), labels


def test_pack_arrays_is_lossless_small_and_read_by_npz_source(tmp_path):
    train, test = _fashion_like(60, 0), _fashion_like(20, 1)
    names = ["tee", "trouser", "pullover", "dress", "coat"]
    path = pack_arrays(tmp_path / "f.npz", train, test, names=names)
    np.savez(tmp_path / "raw.npz", train_images=train[0], train_labels=train[1], test_images=test[0],
             test_labels=test[1])
    assert path.stat().st_size < (tmp_path / "raw.npz").stat().st_size
    with np.load(path) as z:
        assert sorted(z.files) == sorted(["train_bytes", "train_offsets", "train_labels", "test_bytes",
                                          "test_offsets", "test_labels", "names", "meta"])
        assert z["train_labels"].dtype == np.int16 and len(z["train_offsets"]) == 61
        first = Image.open(io.BytesIO(z["train_bytes"][z["train_offsets"][0] : z["train_offsets"][1]].tobytes()))
        assert first.format == "PNG" and first.mode == "L"  # grayscale stays one channel in the file
    source = NpzSource(str(path))
    images, labels = source.arrays("train")
    assert source.class_names == names and np.array_equal(labels, train[1])
    assert images.shape == (60, 3, 28, 28) and all(np.array_equal(images[:, c], train[0]) for c in range(3))
    selected = NpzSource(str(path), classes=["coat", "tee"])  # decodes only the kept images of the pack
    keep = np.isin(train[1], [4, 0])
    assert np.array_equal(selected.arrays("train")[0], images[keep])
    assert selected.labels("train").tolist() == [{4: 0, 0: 1}[c] for c in train[1][keep]]
    subset = NpzSource(str(pack_arrays(tmp_path / "s.npz", train, test, names=names, classes=["coat", "tee"])))
    assert subset.class_names == ["coat", "tee"] and np.bincount(subset.labels("test")).tolist() == [4, 4]
    lossy = NpzSource(str(pack_arrays(tmp_path / "w.npz", train, test, names=names, format="webp", quality=80)))
    assert lossy.meta["format"] == "webp" and lossy.meta["quality"] == 80
    assert np.abs(lossy.arrays("test")[0][:, 0].astype(int) - test[0].astype(int)).mean() < 6
    with pytest.raises(ValueError, match="test has 20 images but 19 labels"):
        pack_arrays(tmp_path / "bad.npz", train, (test[0], test[1][:19]))


def test_cdl_pack_from_an_npz_of_arrays_with_a_random_class_subset(tmp_path, capsys):
    train, test = _fashion_like(30, 0), _fashion_like(10, 1)
    np.savez(tmp_path / "arrays.npz", train_images=train[0][..., None], train_labels=train[1],
             val_images=test[0][..., None], val_labels=test[1])
    main(["pack", str(tmp_path / "arrays.npz"), str(tmp_path / "packed.npz"), "--classes", "{random: 3, seed: 0}"])
    assert "3 classes, train 18, test 6 images" in capsys.readouterr().out
    source = NpzSource(str(tmp_path / "packed.npz"))
    kept = np.random.default_rng(0).permutation(5)[:3]
    assert source.class_names == [str(c) for c in kept]
    assert np.array_equal(source.arrays("test")[0][:, 0], test[0][np.isin(test[1], kept)])


def _folder(root: Path, sizes: list[tuple[int, int]]) -> None:
    for split, per_class in (("train", 2), ("val", 1)):
        for c, name in enumerate(["ant", "bee"]):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                size = sizes[(c + i) % len(sizes)]
                Image.new("RGB", size, (100 * c, 30 * i, 7)).save(root / split / name / f"{i}.jpg", quality=95)


def test_pack_folder_keeps_files_resizes_on_request_and_refuses_mixed_sizes(tmp_path):
    _folder(tmp_path / "same", [(12, 10)])
    path = pack_folder(tmp_path / "same", tmp_path / "same.npz")  # auto: the original JPEG bytes
    with np.load(path) as z:
        original = (tmp_path / "same" / "train" / "ant" / "0.jpg").read_bytes()
        assert z["train_bytes"][: z["train_offsets"][1]].tobytes() == original
        assert z["test_labels"].tolist() == [0, 1] and list(z["names"]) == ["ant", "bee"]
    assert NpzSource(str(path)).meta["layout"] == "folders"
    _folder(tmp_path / "mixed", [(12, 10), (20, 16)])
    with pytest.raises(ValueError, match=r"differ in size \(2 sizes.*give size \(`--size S`\)"):
        pack_folder(tmp_path / "mixed", tmp_path / "mixed.npz")
    source = NpzSource(str(pack_folder(tmp_path / "mixed", tmp_path / "mixed.npz", size=8, format="png")))
    assert source.arrays("train")[0].shape == (4, 3, 8, 8)
    first = Image.open(tmp_path / "mixed" / "train" / "ant" / "0.jpg").convert("RGB")
    left = (round(12 * 8 / 10) - 8) // 2
    expected = np.asarray(first.resize((round(12 * 8 / 10), 8), Image.BILINEAR).crop((left, 0, left + 8, 8)))
    assert np.array_equal(source.arrays("train")[0][0].transpose(1, 2, 0), expected)


def test_cdl_pack_subsets_an_existing_pack_without_re_encoding(tmp_path, capsys):
    train, test = _fashion_like(30, 0), _fashion_like(10, 1)
    names = ["tee", "trouser", "pullover", "dress", "coat"]
    full = pack_arrays(tmp_path / "full.npz", train, test, names=names, format="webp", quality=70)
    main(["pack", str(full), str(tmp_path / "part.npz"), "--classes", "{seed: 0, start: 2}"])
    assert "3 classes, train 18, test 6 images" in capsys.readouterr().out
    part, expected = NpzSource(str(tmp_path / "part.npz")), NpzSource(str(full), classes={"seed": 0, "start": 2})
    assert part.class_names == expected.class_names == [names[c] for c in np.random.default_rng(0).permutation(5)[2:]]
    assert np.array_equal(part.arrays("train")[0], expected.arrays("train")[0])  # the same WebP bytes, decoded
    assert np.array_equal(part.labels("test"), expected.labels("test")) and part.meta["format"] == "original"


def test_decoded_images_are_cached_on_disk_bit_for_bit(tmp_path, monkeypatch):
    """An encoded split is decoded once: the next source (another process in practice) loads the cached ``.npy``,
    the same arrays; a cache file cut short is decoded again and rewritten; ``decode_cache=None`` writes nothing."""
    import cdl_lightning.data.npz as npz

    train, test = _fashion_like(60, 0), _fashion_like(20, 1)
    path = str(pack_arrays(tmp_path / "f.npz", train, test, names=["a", "b", "c", "d", "e"], format="webp"))
    cache = tmp_path / "cache"
    selection = ["e", "a"]  # a class selection decodes per source (no process-wide reuse of the full split)
    first = NpzSource(path, classes=selection, decode_cache=str(cache)).arrays("train")[0]
    files = sorted(cache.glob("*.npy"))
    assert len(files) == 1 and not list(cache.glob(".tmp-*"))
    assert np.array_equal(np.load(files[0]), first)

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded although cached")

    with monkeypatch.context() as patch:
        patch.setattr(npz, "decode_images", no_decoding)
        again = NpzSource(path, classes=selection, decode_cache=str(cache)).arrays("train")[0]
    assert again.dtype == np.uint8 and np.array_equal(again, first)
    # another selection is other images: another file
    NpzSource(path, classes=["b"], decode_cache=str(cache)).arrays("train")
    assert len(list(cache.glob("*.npy"))) == 2
    # a file cut short (a crash while writing outside our atomic rename, a full disk) is decoded and rewritten
    files[0].write_bytes(files[0].read_bytes()[:100])
    assert np.array_equal(NpzSource(path, classes=selection, decode_cache=str(cache)).arrays("train")[0], first)
    assert np.array_equal(np.load(files[0]), first)
    # no cache, or a split above the size limit: nothing written
    NpzSource(path, classes=["c"], decode_cache=None).arrays("train")
    NpzSource(path, classes=["d"], decode_cache=str(cache), decode_cache_max_gb=0).arrays("train")
    assert len(list(cache.glob("*.npy"))) == 2


def test_an_unwritable_decode_cache_warns_once_and_decodes(tmp_path):
    train, test = _fashion_like(20, 0), _fashion_like(10, 1)
    path = str(pack_arrays(tmp_path / "f.npz", train, test))
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.warns(UserWarning, match="cannot write the decoded-image cache"):
        images = NpzSource(path, classes=[0, 1], decode_cache=str(blocker / "cache")).arrays("train")[0]
    assert images.shape == (8, 3, 28, 28)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second time: silent
        NpzSource(path, classes=[2], decode_cache=str(blocker / "cache")).arrays("train")


def test_decode_cache_without_a_home_directory_is_off_with_a_warning(monkeypatch):
    import cdl_lightning.data.npz as npz

    def no_home():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.delenv("CDL_CACHE_DIR", raising=False)
    monkeypatch.setattr(Path, "home", staticmethod(no_home))
    monkeypatch.setattr(npz, "_CACHE_WARNED", set())
    with pytest.warns(UserWarning, match="no home directory"):
        assert npz.decode_cache_dir("auto") is None
    assert npz.decode_cache_dir(None) is None and npz.decode_cache_dir("/x/y") == Path("/x/y")
