"""The deployment path: a trained student serves predictions for a folder of images through ``cdl predict``."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from _cli_helpers import TINY_BACKBONE, as_args, cpu_run_options
from PIL import Image

from cdl_lightning.cli import cli_main


def common(save_dir) -> list[str]:
    return as_args({
        **cpu_run_options(save_dir, "student"),
        "--trainer.limit_train_batches": 2,
        "--data.source.num_classes": 6,
        "--data.source.train_per_class": 8,
        "--data.source.test_per_class": 4,
        "--data.num_tasks": 2,
        "--data.batch_size": 4,
        "--data.image_size": 32,
        "--model": "cdl_lightning.models.Distiller",
        "--model.backbone": TINY_BACKBONE,
        "--model.prompt": "cdl_lightning.nn.prompts.L2P",
        "--model.prompt.pool_size": 6,
        "--model.prompt.top_k": 2,
        "--evaluation.print_table": "false",
    })


def test_cdl_predict_writes_a_class_per_file(tmp_path):
    fitted = cli_main(["fit", *common(tmp_path / "runs")]).model
    checkpoint = tmp_path / "runs" / "student" / "checkpoints" / "last.ckpt"
    folder = tmp_path / "images" / "nested"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = ["a.png", "b.jpg", "c.png", "d.png", "e.jpeg"]
    for i, name in enumerate(names):
        size = 24 + 8 * i  # any size: resized / centre-cropped to the model's input
        Image.fromarray(rng.integers(0, 255, (size, size + 3, 3), dtype=np.uint8)).save(folder / name)
    (folder / "notes.txt").write_text("not an image")
    predicted = cli_main(
        [
            "predict",
            *common(tmp_path / "runs"),
            "--ckpt_path",
            str(checkpoint),
            "--data.predict_root",
            str(tmp_path / "images"),
            "--data.eval_batch_size",
            "2",
        ]
    )
    # the default PredictionWriter writes into the run folder (the logger's log_dir)
    rows = list(csv.DictReader(open(tmp_path / "runs" / "student" / "predictions.csv")))
    assert sorted(r["file"].split("/")[-1] for r in rows) == sorted(names)
    class_names = [
        f"{shape}_{c // 8}" for c, shape in enumerate(["disk", "square", "ring", "plus", "triangle", "bars"])
    ]
    # independently of predict_step and the writer: the fitted model (in memory, not reloaded from the checkpoint) on
    # the same preprocessed images gives each file's class (argmax) and score (top softmax probability)
    data = predicted.datamodule
    fitted.eval()
    expected = {}
    with torch.no_grad():
        for images, index in data.predict_dataloader():
            probs = torch.softmax(fitted(data.preprocess(images, train=False), 1).float(), dim=1)
            for i, p in zip(index.tolist(), probs, strict=True):
                expected[str(data.predict_paths[i])] = p
    assert len(expected) == len(names)
    for row in rows:
        index, probs = int(row["class_index"]), expected[row["file"]]
        assert row["class_name"] == class_names[index]
        assert index == int(probs.argmax())
        assert float(row["score"]) == pytest.approx(probs.max().item(), abs=1e-6)  # the CSV rounds to 6 digits
