"""Data sources: synthetic set, npz packs and arrays, ImageFolder trees, CIFAR-100 errors and loading."""

import io
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from cdl_lightning.data import CIFAR100, ImageFolderSource, NpzSource, SyntheticShapes
from cdl_lightning.data.npz import decode_images
from cdl_lightning.data.splits import select_classes


def _ncm_accuracy(train_x, train_y, test_x, test_y, num_classes):
    means = torch.stack([train_x[train_y == c].mean(0) for c in range(num_classes)])
    return (torch.cdist(test_x, means).argmin(1) == test_y).float().mean().item()


def test_synthetic_deterministic_and_learnable():
    source = SyntheticShapes()
    train_x, train_y = source.arrays("train")
    test_x, test_y = source.arrays("test")
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
    with pytest.raises(FileNotFoundError, match=r"nowhere.*accepted layouts"):
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


# ------------------------------------------------------------------------------------------------ class selection
def test_select_classes_by_name_index_and_seeded_subsets():
    names = [f"c{i}" for i in range(10)]
    assert select_classes(names, None) is None
    assert select_classes(names, ["c3", 1, "7"]) == [3, 1, 7]  # names, ints and digit strings (indices)
    permutation = np.random.default_rng(0).permutation(10)
    assert select_classes(names, {"random": 4, "seed": 0}) == permutation[:4].tolist()
    assert select_classes(names, {"seed": 0, "start": 6, "stop": 10}) == permutation[6:].tolist()
    assert select_classes(names, {"seed": 0, "start": 6}) == permutation[6:].tolist()
    first, rest = select_classes(names, {"seed": 0, "stop": 6}), select_classes(names, {"seed": 0, "start": 6})
    assert sorted(first + rest) == list(range(10))  # complementary slices: disjoint, together every class
    with pytest.raises(ValueError, match=r"unknown class name 'c33' \(did you mean 'c3'"):
        select_classes(names, ["c33"])
    # ids (e.g. WordNet ids) and unique short names (before the first comma) name classes too
    long_names = ["goldfish, Carassius auratus", "bullfrog, Rana", "frog, tree", "frog, tailed"]
    ids = ["n01", "n02", "n03", "n04"]
    assert select_classes(long_names, ["n03", "bullfrog", "goldfish, Carassius auratus"], ids) == [2, 1, 0]
    with pytest.raises(ValueError, match=r"unknown class name 'frog' \(did you mean"):
        select_classes(long_names, ["frog"], ids)  # ambiguous short name
    with pytest.raises(ValueError, match="listed more than once"):
        select_classes(names, ["c1", 1])
    with pytest.raises(ValueError, match=r"out of range \[0, 10\): \[12\]"):
        select_classes(names, [12])
    with pytest.raises(ValueError, match="unknown keys"):
        select_classes(names, {"seed": 0, "count": 3})
    with pytest.raises(ValueError, match="start < stop"):
        select_classes(names, {"seed": 0, "start": 8, "stop": 12})


def test_every_source_selects_classes(tmp_path, monkeypatch):
    full = SyntheticShapes(num_classes=8, train_per_class=3, test_per_class=2, image_size=8)
    part = SyntheticShapes(num_classes=8, train_per_class=3, test_per_class=2, image_size=8, classes=["ring_0", 0])
    assert part.class_names == ["ring_0", "disk_0"] and part.num_classes == 2 and len(part.all_class_names) == 8
    images, labels = part.arrays("train")
    assert labels.tolist() == [1, 1, 1, 0, 0, 0]  # source order kept, labels renumbered in selection order
    assert np.array_equal(images, full.arrays("train")[0][[0, 1, 2, 6, 7, 8]])  # the same images as the full set
    assert part.labels("test").tolist() == [1, 1, 0, 0] and part.dataset("test")[2][1] == 0
    assert "kept 2 of 8 classes" in repr(part)

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "a.npz", train_images=rng.integers(0, 256, (9, 4, 4, 3), dtype=np.uint8),
             train_labels=np.arange(9) % 3, test_images=rng.integers(0, 256, (3, 4, 4, 3), dtype=np.uint8),
             test_labels=np.arange(3), names=np.array(["ant", "bee", "cow"]))
    npz = NpzSource(str(tmp_path / "a.npz"), classes=["cow", "ant"])
    assert npz.class_names == ["cow", "ant"] and npz.labels("train").tolist() == [1, 0, 1, 0, 1, 0]
    assert np.array_equal(npz.arrays("test")[0], NpzSource(str(tmp_path / "a.npz")).arrays("test")[0][[0, 2]])
    with pytest.raises(ValueError, match=r"'bea' \(did you mean 'bee'"):
        NpzSource(str(tmp_path / "a.npz"), classes=["bea"])

    _write_tree(tmp_path / "tree" / "train", per_class=2)
    _write_tree(tmp_path / "tree" / "val", per_class=1)
    folder = ImageFolderSource(str(tmp_path / "tree"), classes=["eel", "cat"])
    assert folder.class_names == ["eel", "cat"] and folder.labels("train").tolist() == [1, 1, 0, 0]
    assert [Path(p).parent.name for p in folder.paths("test")] == ["cat", "eel"]
    image, label = folder.dataset("test")[1]
    assert label == 0 and image.getpixel((0, 0))[0] == 40 * 2 + 10  # eel's colour

    monkeypatch.setattr(torchvision.datasets.CIFAR100, "_check_integrity", lambda self: True)
    cifar = CIFAR100(str(tmp_path), download=True, classes={"random": 5, "seed": 1})
    assert cifar.num_classes == 5 and cifar.class_names == [
        cifar.all_class_names[c] for c in np.random.default_rng(1).permutation(100)[:5]
    ]
    assert CIFAR100(str(tmp_path), download=True, classes=["apple", "bear"]).class_names == ["apple", "bear"]


def test_class_order_takes_names_with_close_matches():
    from cdl_lightning.data import ContinualDataModule

    source = SyntheticShapes(num_classes=4, train_per_class=2, test_per_class=1, image_size=8)
    dm = ContinualDataModule(source, num_tasks=2, class_order=["plus_0", "disk_0", 2, "square_0"], image_size=8)
    assert dm.class_order == [3, 0, 2, 1] and dm.class_names == ["plus_0", "disk_0", "ring_0", "square_0"]
    with pytest.raises(ValueError, match=r"class_order: unknown class name 'sqare_0' \(did you mean 'square_0'"):
        ContinualDataModule(source, num_tasks=2, class_order=["plus_0", "disk_0", "ring_0", "sqare_0"])


# ------------------------------------------------------------------------------------- channels, shapes, labels
@pytest.mark.parametrize("layout", ["nhw", "nhw1", "n1hw", "nhw3", "n3hw"])
def test_npz_grayscale_and_channel_layouts(tmp_path, layout):
    gray = np.random.default_rng(0).integers(0, 256, (6, 5, 7), dtype=np.uint8)
    stored = {
        "nhw": gray,
        "nhw1": gray[..., None],
        "n1hw": gray[:, None],
        "nhw3": np.repeat(gray[..., None], 3, axis=-1),
        "n3hw": np.repeat(gray[:, None], 3, axis=1),
    }[layout]
    np.savez(tmp_path / "g.npz", train_images=stored, train_labels=np.arange(6) % 2, test_images=stored[:2],
             test_labels=np.array([0, 1]))
    images, labels = NpzSource(str(tmp_path / "g.npz")).arrays("train")
    assert images.shape == (6, 3, 5, 7) and images.dtype == np.uint8
    assert all(np.array_equal(images[:, c], gray) for c in range(3))


def test_npz_construction_checks_name_the_file_and_split(tmp_path):
    x = np.zeros((4, 8, 8, 3), dtype=np.uint8)
    cases = {
        "counts": (dict(train_images=x, train_labels=np.arange(3)), r"split 'train': 4 images .* but 3 labels"),
        "float": (dict(train_images=x.astype(np.float32), train_labels=np.arange(4)), r"must be uint8, got float32"),
        "rgba": (dict(train_images=np.zeros((4, 8, 8, 4), np.uint8), train_labels=np.arange(4)), "drop the alpha"),
        "range": (dict(train_images=x, train_labels=np.array([0, 1, 2, 5]), names=np.array(list("abc"))),
                  r"split 'train': 1 labels fall outside \[0, 3\)"),
        "offsets": (dict(train_bytes=np.zeros(10, np.uint8), train_offsets=np.array([0, 5, 10]),
                         train_labels=np.arange(3)), r"train_offsets has 3 entries, so 2 images, but"),
    }
    for name, (arrays, message) in cases.items():
        path = tmp_path / f"{name}.npz"
        np.savez(path, **arrays, test_images=x, test_labels=np.zeros(4, np.int64))
        with pytest.raises(ValueError, match=message) as info:
            NpzSource(str(path))
        assert str(path) in str(info.value), name


def test_folder_images_of_any_mode_become_rgb(tmp_path):
    folder = tmp_path / "modes" / "a"
    folder.mkdir(parents=True)
    Image.new("L", (6, 5), 77).save(folder / "gray.png")
    Image.new("RGBA", (6, 5), (10, 20, 30, 0)).save(folder / "rgba.png")
    Image.new("LA", (6, 5), (90, 3)).save(folder / "la.png")
    Image.new("CMYK", (6, 5), (0, 0, 0, 0)).save(folder / "cmyk.jpg")
    palette = Image.new("P", (6, 5), 1)
    palette.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    palette.info["transparency"] = 0
    palette.save(folder / "palette.png", transparency=0)
    Image.fromarray(np.full((5, 6), 65535, dtype=np.uint16)).save(folder / "sixteen.png")
    Image.new("1", (6, 5), 1).save(folder / "binary.bmp")
    (tmp_path / "modes" / "b").mkdir()
    Image.new("RGB", (6, 5), (1, 2, 3)).save(tmp_path / "modes" / "b" / "rgb.png")
    source = ImageFolderSource(str(tmp_path / "modes"), test_root=str(tmp_path / "modes"))
    expected = {"binary.bmp": (255,) * 3, "cmyk.jpg": (255,) * 3, "gray.png": (77,) * 3, "la.png": (90,) * 3,
                "palette.png": (200, 100, 50), "rgba.png": (10, 20, 30), "sixteen.png": (255,) * 3}
    dataset = source.dataset("train")
    seen = {}
    for i, path in enumerate(source.paths("train")):
        image, _ = dataset[i]
        assert image.mode == "RGB" and image.size == (6, 5)
        seen[Path(path).name] = image.getpixel((2, 2))
    assert {k: v for k, v in seen.items() if k != "rgb.png"} == expected


# ----------------------------------------------------------------------------------------------------- layouts
def test_folder_layouts_train_val_valid_and_refusals(tmp_path):
    for test_name in ("val", "valid", "validation", "test"):
        _write_tree(tmp_path / test_name / "train", per_class=2)
        _write_tree(tmp_path / test_name / test_name, per_class=1)
        source = ImageFolderSource(str(tmp_path / test_name))
        assert source.split_mode == "folders" and source.class_names == ["cat", "dog", "eel"]
        assert all(f"/{test_name}/" in p for p in source.paths("test")) and len(source.labels("test")) == 3
    _write_tree(tmp_path / "lonely" / "train", per_class=2)
    with pytest.raises(FileNotFoundError, match=r"train exists but no test split .*accepted layouts"):
        ImageFolderSource(str(tmp_path / "lonely"))
    _write_tree(tmp_path / "mixed" / "train", per_class=2)
    _write_tree(tmp_path / "mixed", classes=("cat",), per_class=2)
    with pytest.raises(ValueError, match=r"include \['train'\], which look like split names.*accepted layouts"):
        ImageFolderSource(str(tmp_path / "mixed"))


def _write_tiny_imagenet(root: Path, wnids=("n001", "n002", "n003"), per_class=3, val_per_class=2):
    (root / "wnids.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "wnids.txt").write_text("\n".join(wnids))
    (root / "words.txt").write_text("\n".join(f"{w}\tthing {w[-1]}, alias" for w in wnids))
    lines = []
    for c, wnid in enumerate(wnids):
        (root / "train" / wnid / "images").mkdir(parents=True)
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
        for i in range(per_class):
            Image.new("RGB", (8, 8), (50 * c, i, 0)).save(root / "train" / wnid / "images" / f"{wnid}_{i}.JPEG")
        for i in range(val_per_class):
            lines.append(f"val_{c * val_per_class + i}.JPEG\t{wnid}\t0\t0\t8\t8")
    (root / "val" / "images").mkdir(parents=True)
    for n, line in enumerate(lines):
        image = Image.new("RGB", (8, 8), (50 * (n // val_per_class), 100 + n, 0))
        image.save(root / "val" / "images" / line.split()[0])
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    (root / "test" / "images").mkdir(parents=True)  # unlabelled: ignored
    Image.new("RGB", (8, 8)).save(root / "test" / "images" / "test_0.JPEG")


def test_folder_reads_tiny_imagenet_layout(tmp_path):
    _write_tiny_imagenet(tmp_path / "tiny")
    source = ImageFolderSource(str(tmp_path / "tiny"))
    assert source.split_mode == "tiny_imagenet" and source.class_names == ["n001", "n002", "n003"]
    assert source.labels("train").tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert source.labels("test").tolist() == [0, 0, 1, 1, 2, 2]
    assert [Path(p).name for p in source.paths("test")][:2] == ["val_0.JPEG", "val_1.JPEG"]
    part = ImageFolderSource(str(tmp_path / "tiny"), classes=["n003"])
    assert part.labels("test").tolist() == [0, 0] and Path(part.paths("test")[0]).name == "val_4.JPEG"


# ------------------------------------------------------------------------------------ empty and corrupt files
def test_empty_class_folder_and_corrupt_files(tmp_path):
    _write_tree(tmp_path / "e" / "train", per_class=2)
    _write_tree(tmp_path / "e" / "test", per_class=1)
    (tmp_path / "e" / "train" / "fox").mkdir()
    with pytest.raises(ValueError, match=r"1 class folder\(s\) hold no image.*train/fox"):
        ImageFolderSource(str(tmp_path / "e"))
    (tmp_path / "e" / "train" / "fox").rmdir()
    (tmp_path / "e" / "train" / "dog" / "bad.jpg").write_bytes(b"not a jpeg at all")
    (tmp_path / "e" / "test" / "cat" / "empty.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"1 of 7 train files .* cannot be read as images:\n  .*dog/bad.jpg"):
        ImageFolderSource(str(tmp_path / "e"))
    with pytest.warns(UserWarning, match=r"skipping 1 corrupt train file\(s\) of 7 \(skip_corrupt\):\n  .*bad.jpg"):
        source = ImageFolderSource(str(tmp_path / "e"), skip_corrupt=True)
    assert len(source.paths("train")) == 6 and len(source.paths("test")) == 3
    assert sorted(Path(p).name for p in source.corrupt_files) == ["bad.jpg", "empty.png"]
    # a truncated JPEG passes the header check; verify="decode" finds it
    data = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(data, "JPEG")
    (tmp_path / "e" / "train" / "dog" / "bad.jpg").write_bytes(data.getvalue()[: len(data.getvalue()) // 2])
    (tmp_path / "e" / "test" / "cat" / "empty.png").unlink()
    assert len(ImageFolderSource(str(tmp_path / "e")).paths("train")) == 7
    with pytest.raises(ValueError, match=r"bad.jpg: OSError"):
        ImageFolderSource(str(tmp_path / "e"), verify="decode")


def test_a_custom_source_gets_class_selection_from_the_base():
    from cdl_lightning.data import DataSource, SelectedDataset

    class Letters(DataSource):
        fixed_size = True

        def __init__(self, classes=None):
            self.class_names = ["a", "b", "c"]
            self.select(classes)

        def _labels(self, split):
            return np.array([0, 1, 2, 0, 1, 2])

        def _dataset(self, split):
            return [(torch.full((3, 2, 2), i, dtype=torch.uint8), int(c)) for i, c in enumerate(self._labels(split))]

    source = Letters(classes=["c", "a"])
    assert source.num_classes == 2 and source.labels("train").tolist() == [1, 0, 1, 0]
    dataset = source.dataset("train")
    assert isinstance(dataset, SelectedDataset) and len(dataset) == 4
    assert [(int(image[0, 0, 0]), label) for image, label in dataset] == [(0, 1), (2, 0), (3, 1), (5, 0)]
    assert Letters().dataset("test")[4][1] == 1  # no selection: the source's own dataset
