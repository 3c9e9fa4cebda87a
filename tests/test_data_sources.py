"""Data sources: synthetic set, npz packs and arrays, ImageFolder trees, CIFAR-100 errors and loading."""

import io
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from cdl_lightning.data import CIFAR100, ImageFolderSource, NpzSource, SyntheticShapes
from cdl_lightning.data.npz import decode_images

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _ncm_accuracy(train_x, train_y, test_x, test_y, num_classes):
    means = torch.stack([train_x[train_y == c].mean(0) for c in range(num_classes)])
    return (torch.cdist(test_x, means).argmin(1) == test_y).float().mean().item()


def test_synthetic_deterministic_fast_and_learnable():
    start = time.perf_counter()
    source = SyntheticShapes()
    train_x, train_y = source.arrays("train")
    test_x, test_y = source.arrays("test")
    assert time.perf_counter() - start < 2.0
    assert train_x.shape == (2000, 3, 32, 32) and train_x.dtype == np.uint8 and test_x.shape == (400, 3, 32, 32)
    assert np.bincount(train_y).tolist() == [100] * 20 and np.bincount(test_y).tolist() == [20] * 20
    assert source.num_classes == 20 and source.class_names[:2] == ["disk_0", "square_0"]
    assert np.array_equal(SyntheticShapes().arrays("train")[0], train_x)
    assert not np.array_equal(SyntheticShapes(seed=1).arrays("train")[0], train_x)
    assert not np.array_equal(train_x[:400], test_x)  # splits come from different seeds
    # the test split does not depend on the number of training images
    assert np.array_equal(SyntheticShapes(train_per_class=5).arrays("test")[0], test_x)
    assert train_x.std() > 30  # not blank
    # learnable: nearest class mean on pixels, and on translation-invariant |FFT| features, far above 1/20 chance
    pix = lambda x: torch.from_numpy(x).float().flatten(1) / 255  # noqa: E731
    acc_pixels = _ncm_accuracy(pix(train_x), torch.from_numpy(train_y), pix(test_x), torch.from_numpy(test_y), 20)
    fft = lambda x: torch.log1p(torch.fft.rfft2(torch.from_numpy(x).float() / 255).abs()[:, :, :8, :8]).flatten(1)  # noqa: E731
    acc_fft = _ncm_accuracy(fft(train_x), torch.from_numpy(train_y), fft(test_x), torch.from_numpy(test_y), 20)
    assert acc_pixels > 0.15, acc_pixels
    assert acc_fft > 0.5, acc_fft


def test_synthetic_dataset_items():
    source = SyntheticShapes(num_classes=3, train_per_class=4, test_per_class=2, image_size=16, seed=5)
    ds = source.dataset("train")
    image, label = ds[5]
    assert len(ds) == 12 and image.shape == (3, 16, 16) and image.dtype == torch.uint8 and label == 1
    assert source.labels("test").tolist() == [0, 0, 1, 1, 2, 2]
    assert SyntheticShapes.fixed_size


def test_npz_pack_tiny_imagenet(shared_pack):
    path = shared_pack("tiny-imagenet-ci.npz")  # skips with a reason when ../shared/data is absent
    source = NpzSource(str(path))
    assert source.num_classes == 20 and source.class_names[0].startswith("goldfish")
    assert len(source.labels("train")) == 800 and len(source.labels("test")) == 200  # val used as test
    assert np.bincount(source.labels("test")).tolist() == [10] * 20
    images, labels = source.arrays("test")
    assert images.shape == (200, 3, 64, 64) and images.dtype == np.uint8
    with np.load(path) as z:
        raw, off = z["val_bytes"], z["val_offsets"]
        first = np.asarray(Image.open(io.BytesIO(raw[off[0] : off[1]].tobytes())).convert("RGB"))
        assert np.array_equal(images[0].transpose(1, 2, 0), first)
        assert np.array_equal(labels, z["val_labels"].astype(np.int64))
        # decoding in worker processes gives the same arrays
        assert np.array_equal(decode_images(raw, off, workers=2), decode_images(raw, off, workers=0))
    image, label = source.dataset("train")[3]
    assert image.shape == (3, 64, 64) and label == source.labels("train")[3]
    assert "test=200 (val)" in repr(source)


def test_npz_decoded_arrays(tmp_path):
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (12, 8, 8, 3), dtype=np.uint8)
    test = rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    path = tmp_path / "arrays.npz"
    np.savez(
        path,
        train_images=train,
        train_labels=np.arange(12) % 3,
        test_images=test,
        test_labels=np.arange(6) % 3,
        names=np.array(["a", "b", "c"]),
    )
    source = NpzSource(str(path))
    assert source.num_classes == 3 and source.class_names == ["a", "b", "c"]
    images, labels = source.arrays("test")
    assert np.array_equal(images, test.transpose(0, 3, 1, 2)) and labels.tolist() == [0, 1, 2, 0, 1, 2]
    np.savez(tmp_path / "bad.npz", train_images=train, train_labels=np.zeros(12))
    with pytest.raises(ValueError, match="no test or val split"):
        NpzSource(str(tmp_path / "bad.npz"))
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        NpzSource(str(tmp_path / "missing.npz"))


def _write_tree(root: Path, classes=("cat", "dog", "eel"), per_class=5, offset=0):
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            size = (20 + 4 * i, 14 + 3 * c)
            Image.new("RGB", size, (40 * c + 10, 5 * i + offset, 100)).save(root / name / f"{i:02d}.png")


def test_image_folder_per_class_split(tmp_path):
    _write_tree(tmp_path / "imr")
    (tmp_path / "imr" / "cat" / "notes.txt").write_text("not an image")
    source = ImageFolderSource(str(tmp_path / "imr"), seed=0)
    assert source.class_names == ["cat", "dog", "eel"] and source.split_mode == "per_class"
    assert np.bincount(source.labels("train")).tolist() == [4, 4, 4]
    assert np.bincount(source.labels("test")).tolist() == [1, 1, 1]
    assert not set(source.paths("train")) & set(source.paths("test"))
    again = ImageFolderSource(str(tmp_path / "imr"), seed=0)
    assert again.paths("test") == source.paths("test")
    image, label = source.dataset("test")[2]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and label == 2
    assert not ImageFolderSource.fixed_size


def test_image_folder_given_splits(tmp_path):
    _write_tree(tmp_path / "a" / "train", per_class=3)
    _write_tree(tmp_path / "a" / "test", classes=("cat", "eel"), per_class=2)
    source = ImageFolderSource(str(tmp_path / "a"))
    assert source.split_mode == "folders"
    assert source.labels("train").tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert source.labels("test").tolist() == [0, 0, 2, 2]
    _write_tree(tmp_path / "b", per_class=2)
    _write_tree(tmp_path / "b_test", classes=("dog",), per_class=1)
    source = ImageFolderSource(str(tmp_path / "b"), test_root=str(tmp_path / "b_test"))
    assert source.split_mode == "test_root" and source.labels("test").tolist() == [1]
    _write_tree(tmp_path / "c_test", classes=("yak",), per_class=1)
    with pytest.raises(ValueError, match="yak"):
        ImageFolderSource(str(tmp_path / "b"), test_root=str(tmp_path / "c_test"))


def test_image_folder_missing_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere.*class subfolders"):
        ImageFolderSource(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no class folders"):
        ImageFolderSource(str(tmp_path / "empty"))
    _write_tree(tmp_path / "x", per_class=1)
    with pytest.raises(FileNotFoundError, match="test_root"):
        ImageFolderSource(str(tmp_path / "x"), test_root=str(tmp_path / "nope"))


def test_cifar100_missing_and_offline(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"cifar-100-python.*download: true"):
        CIFAR100(str(tmp_path))
    source = CIFAR100(str(tmp_path), download=True)  # missing files are fine until prepare()
    assert source.num_classes == 100 and source.class_names[:3] == ["apple", "aquarium_fish", "baby"]
    monkeypatch.setattr(torchvision.datasets.CIFAR100, "url", "http://127.0.0.1:9/cifar-100-python.tar.gz")
    with pytest.raises(RuntimeError, match=r"offline.*Place the files manually.*download: false"):
        source.prepare()


def test_cifar100_reads_python_files(tmp_path, monkeypatch):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(0)
    data = {}
    for split, n in (("train", 6), ("test", 4)):
        data[split] = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        with open(folder / split, "wb") as f:
            pickle.dump({"data": data[split], "fine_labels": list(range(n))}, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": CIFAR100(str(tmp_path)).class_names}, f)
    monkeypatch.setattr(torchvision.datasets.CIFAR100, "_check_integrity", lambda self: True)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args: True)
    images, labels = CIFAR100(str(tmp_path)).arrays("train")
    assert images.shape == (6, 3, 32, 32) and labels.tolist() == list(range(6))
    assert np.array_equal(images, data["train"].reshape(6, 3, 32, 32))
