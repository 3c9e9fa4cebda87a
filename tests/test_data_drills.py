"""Drills with data users bring (issues 9.5 and 10): bad data fails before compute through `cdl fit`, naming the file
and the fix; own folders, npz files and class subsets run; one eval transform for validate and predict."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from _cli_helpers import TINY_BACKBONE, as_args, cpu_run_options
from PIL import Image

from cdl_lightning.cli import cli_main, main
from cdl_lightning.data import (
    ContinualDataModule,
    ImageFolderSource,
    NpzSource,
    PredictCollate,
    PredictDataset,
    SyntheticShapes,
)
from cdl_lightning.nn.vit import create_vit


def _options(tmp_path: Path, **extra: object) -> list[str]:
    """A tiny 2-task CPU fit (4 training batches a task) on the given data options."""
    return as_args({
        **cpu_run_options(tmp_path / "runs", "drill"),
        "--data.num_tasks": 2,
        "--data.batch_size": 4,
        "--data.image_size": 32,
        "--data.num_workers": 0,
        "--trainer.limit_train_batches": 4,
        "--model.backbone": TINY_BACKBONE,
        "--model.prompt": "cdl_lightning.nn.prompts.L2P",
        "--model.prompt.pool_size": 4,
        "--model.prompt.top_k": 1,
        "--evaluation.print_table": "false",
        **extra,
    })


def _fit_fails(args: list[str]) -> str:
    """Run ``cdl fit`` expecting a user error before training; return the error text (exception or stderr)."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), pytest.raises((ValueError, FileNotFoundError, SystemExit)) as info:
        main(["fit", *args])
    if isinstance(info.value, SystemExit):
        assert info.value.code not in (0, None), "a failed run must not exit 0"
    return f"{info.value}\n{stderr.getvalue()}"


def _metrics(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "runs" / "drill" / "metrics.json").read_text())


def _tree(root: Path, classes: list[str], per_class: int, size: tuple[int, int] = (24, 20)) -> None:
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.new("RGB", size, (60 * c + 5, 20 * i, 120)).save(root / name / f"{i}.png")


# --------------------------------------------------------------------------------------------- failing early (9.5)
def test_empty_class_folder_fails_before_training(tmp_path):
    _tree(tmp_path / "data" / "train", ["ant", "bee", "cow", "dog"], 3)
    _tree(tmp_path / "data" / "val", ["ant", "bee", "cow", "dog"], 1)
    (tmp_path / "data" / "train" / "eel").mkdir()
    (tmp_path / "data" / "val" / "eel").mkdir()
    text = _fit_fails(_options(tmp_path, **{"--data.source": "cdl_lightning.data.ImageFolderSource",
                                            "--data.source.root": tmp_path / "data"}))
    assert "hold no image" in text and str(tmp_path / "data" / "train" / "eel") in text
    assert not (tmp_path / "runs" / "drill" / "checkpoints").exists()


def test_task_without_test_images_fails_at_setup(tmp_path):
    _tree(tmp_path / "data" / "train", ["ant", "bee", "cow", "dog"], 3)
    _tree(tmp_path / "data" / "val", ["ant", "bee"], 1)  # the second task (cow, dog) has nothing to test on
    text = _fit_fails(_options(tmp_path, **{"--data.source": "cdl_lightning.data.ImageFolderSource",
                                            "--data.source.root": tmp_path / "data"}))
    assert "task 1 has no test image (classes ['cow', 'dog'])" in text
    assert not (tmp_path / "runs" / "drill" / "checkpoints").exists()


def test_corrupt_image_fails_listing_it_or_is_skipped_and_counted(tmp_path):
    _tree(tmp_path / "data" / "train", ["ant", "bee", "cow", "dog"], 4)
    _tree(tmp_path / "data" / "test", ["ant", "bee", "cow", "dog"], 2)
    bad = tmp_path / "data" / "train" / "cow" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    data = {"--data.source": "cdl_lightning.data.ImageFolderSource", "--data.source.root": tmp_path / "data"}
    text = _fit_fails(_options(tmp_path, **data))
    assert "1 of 17 train files" in text and str(bad) in text and "skip_corrupt: true" in text
    with pytest.warns(UserWarning, match=r"skipping 1 corrupt train file\(s\) of 17 \(skip_corrupt\):\n  .*broken.jpg"):
        cli = cli_main(["fit", *_options(tmp_path, **data, **{"--data.source.skip_corrupt": "true"})])
    assert cli.datamodule.source.corrupt_files == [str(bad)]
    assert len(_metrics(tmp_path)["accuracy_matrix"]) == 2  # both tasks trained and evaluated


def test_npz_whose_counts_differ_fails_naming_file_and_split(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "bad.npz"
    np.savez(path, train_images=rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8), train_labels=np.arange(8) % 4,
             test_images=rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8), test_labels=np.arange(5) % 4)
    text = _fit_fails(_options(tmp_path, **{"--data.source": "cdl_lightning.data.NpzSource",
                                            "--data.source.path": path}))
    assert f"{path} split 'test': 4 images (test_images) but 5 labels (test_labels)" in text


# --------------------------------------------------------------------------------------- data users bring (10)
def test_fit_on_grayscale_npz_with_a_class_subset_by_name(tmp_path):
    rng = np.random.default_rng(0)
    names = np.array(["zero", "one", "two", "three", "four", "five"])
    path = tmp_path / "gray.npz"
    np.savez(path, train_images=rng.integers(0, 256, (36, 28, 28), dtype=np.uint8), train_labels=np.arange(36) % 6,
             test_images=rng.integers(0, 256, (12, 28, 28, 1), dtype=np.uint8), test_labels=np.arange(12) % 6,
             names=names)
    cli = cli_main(["fit", *_options(tmp_path, **{
        "--data.source": "cdl_lightning.data.NpzSource",
        "--data.source.path": path,
        "--data.source.classes": "[five, one, three, zero]",
        "--data.class_order": "[one, five, zero, three]",
    })])
    dm = cli.datamodule
    assert dm.class_names == ["one", "five", "zero", "three"] and cli.model.class_names == dm.class_names
    assert dm.source.arrays("train")[0].shape == (24, 3, 28, 28)
    matrix = _metrics(tmp_path)["accuracy_matrix"]
    assert len(matrix) == 2 and all(0.0 <= v <= 100.0 for v in matrix[1])


def test_fit_on_train_val_folders_with_a_seeded_class_subset(tmp_path):
    classes = ["ant", "bee", "cow", "dog", "eel", "fox"]
    _tree(tmp_path / "data" / "train", classes, 3)
    _tree(tmp_path / "data" / "val", classes, 1)
    cli = cli_main(["fit", *_options(tmp_path, **{
        "--data.source": "cdl_lightning.data.ImageFolderSource",
        "--data.source.root": tmp_path / "data",
        "--data.source.classes": "{seed: 0, start: 2, stop: 6}",
    })])
    expected = [classes[c] for c in np.random.default_rng(0).permutation(6)[2:6]]
    assert cli.datamodule.source.split_mode == "folders" and cli.datamodule.class_names == expected
    assert len(_metrics(tmp_path)["accuracy_matrix"]) == 2


def test_cdl_pack_then_fit_on_the_pack(tmp_path, capsys):
    from test_data_sources import _write_tiny_imagenet

    _write_tiny_imagenet(tmp_path / "tiny", wnids=("n001", "n002", "n003", "n004"), per_class=4, val_per_class=2)
    main(["pack", str(tmp_path / "tiny"), str(tmp_path / "tiny.npz"), "--size", "32", "--format", "webp"])
    assert "4 classes, train 16, test 8 images" in capsys.readouterr().out
    source = NpzSource(str(tmp_path / "tiny.npz"))
    assert source.class_names == ["thing 1, alias", "thing 2, alias", "thing 3, alias", "thing 4, alias"]
    assert source.arrays("train")[0].shape == (16, 3, 32, 32) and source.meta["layout"] == "tiny_imagenet"
    cli_main(["fit", *_options(tmp_path, **{"--data.source": "cdl_lightning.data.NpzSource",
                                            "--data.source.path": tmp_path / "tiny.npz"})])
    assert len(_metrics(tmp_path)["accuracy_matrix"]) == 2


# ------------------------------------------------------------------------------------- one eval transform (10.4)
class _Recorder(pl.LightningModule):
    """A tiny ViT + head recording the logits of every validation and prediction sample."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.vit = create_vit("vit_tiny_patch16_224", model_kwargs={"img_size": 32, "patch_size": 8, "embed_dim": 32,
                                                                   "depth": 2, "num_heads": 2})
        self.head = torch.nn.Linear(32, 4)
        self.val_logits: list[torch.Tensor] = []
        self.predict_logits: list[torch.Tensor] = []
        self.val_images: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.vit.forward_features(x)[:, 0])

    def validation_step(self, batch, batch_idx):
        self.val_images.append(batch[0])
        self.val_logits.append(self(batch[0]))

    def predict_step(self, batch, batch_idx):
        self.predict_logits.append(self(batch[0]))
        return batch[1]


@pytest.mark.parametrize("test_resize", ["resize", "resize_center_crop"])
def test_predict_gives_validation_logits_bitwise(tmp_path, test_resize):
    rng = np.random.default_rng(0)
    test = rng.integers(0, 256, (8, 20, 20, 3), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", train_images=test, train_labels=np.arange(8) % 4, test_images=test,
             test_labels=np.arange(8) % 4)
    source = NpzSource(str(tmp_path / "d.npz"))
    dm = ContinualDataModule(source, num_tasks=1, image_size=32, eval_batch_size=3, test_resize=test_resize,
                             num_workers=0)
    order = dm.task_dataset("test", [0]).indices  # validation order (interleaved by class)
    (tmp_path / "files").mkdir()
    for rank, position in enumerate(order):  # the same images as lossless files, sorted names in validation order
        Image.fromarray(test[position]).save(tmp_path / "files" / f"{rank:02d}.png")
    model = _Recorder()
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.validate(model, dm)
    dm_predict = ContinualDataModule(source, num_tasks=1, image_size=32, eval_batch_size=3, test_resize=test_resize,
                                     num_workers=0, predict_root=str(tmp_path / "files"))
    trainer.predict(model, dm_predict)
    val, predicted = torch.cat(model.val_logits), torch.cat(model.predict_logits)
    assert val.shape == (8, 4) and torch.equal(val, predicted)
    # a batch of mixed sizes is resized image by image with the same transform
    Image.new("RGB", (30, 26), (9, 9, 9)).save(tmp_path / "odd.png")
    dataset = PredictDataset([str(tmp_path / "files" / "00.png"), str(tmp_path / "odd.png")])
    mixed, index = PredictCollate(dm.eval_resize)([dataset[0], dataset[1]])
    assert mixed.shape == (2, 3, 32, 32) and mixed.dtype == torch.float32 and index.tolist() == [0, 1]
    assert torch.equal(mixed[0], model.val_images[0][0])


def test_num_workers_default_per_source_type(tmp_path):
    _tree(tmp_path / "data", ["ant", "bee"], 3)
    folder = ContinualDataModule(ImageFolderSource(str(tmp_path / "data")), num_tasks=2)
    in_memory = ContinualDataModule(SyntheticShapes(num_classes=2, train_per_class=2, test_per_class=1), num_tasks=2)
    assert folder.num_workers == min(8, len(os.sched_getaffinity(0))) and in_memory.num_workers == 0
    assert ContinualDataModule(SyntheticShapes(num_classes=2), num_tasks=2, num_workers=3).num_workers == 3


def test_readme_own_data_config_builds(tmp_path, monkeypatch):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"## Your own data\n.*?```yaml\n(.*?)```", readme, re.S).group(1)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "my_data.npz", train_images=rng.integers(0, 256, (12, 32, 32), dtype=np.uint8),
             train_labels=np.arange(12) % 6, test_images=rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8),
             test_labels=np.arange(6), names=np.array(["ant", "cat", "dog", "fox", "owl", "yak"]))
    (tmp_path / "my_run.yaml").write_text(block)
    monkeypatch.chdir(tmp_path)
    options = _options(tmp_path)
    del options[options.index("--data.source") : options.index("--data.source") + 2]
    del options[options.index("--data.num_tasks") : options.index("--data.num_tasks") + 2]
    cli = cli_main(["--config", "my_run.yaml", *options], run=False)
    assert cli.datamodule.class_names == ["owl", "cat", "dog", "fox"] and cli.datamodule.task_sizes == [2, 2]
