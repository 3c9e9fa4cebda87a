"""The deployment path: a trained student serves predictions for a folder of images through ``cdl predict``, and
serves alone: without its teacher's run (moved away), from ``cdl validate/predict`` and `load_for_inference`."""

from __future__ import annotations

import csv
import functools
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from _cli_helpers import TINY_BACKBONE, as_args, two_task_run_options
from PIL import Image

from cdl_lightning.cli import cli_main
from cdl_lightning.models import Distiller, PromptLearner
from cdl_lightning.nn import KDP, DistillationMethod, FitNets
from cdl_lightning.nn.prompts import L2P


def common(save_dir) -> list[str]:
    return as_args({
        **two_task_run_options(save_dir, "student"),
        "--model": "cdl_lightning.models.Distiller",
        "--model.backbone": TINY_BACKBONE,
        "--model.prompt": "cdl_lightning.nn.prompts.L2P",
        "--model.prompt.pool_size": 6,
        "--model.prompt.top_k": 2,
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


# ===================================================== a student run serves alone: no teacher file, no training parts
TEACHER_BACKBONE = json.dumps({
    "name": "vit_tiny_patch16_224",
    "pretrained": False,
    "model_kwargs": {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 3, "num_heads": 2},
})


def run_args(save_dir: Path, name: str, model: dict[str, object]) -> list[str]:
    """A 2-task, 1-epoch-per-task CPU run on 6 synthetic classes with the given model options."""
    return as_args({**two_task_run_options(save_dir, name), **model})


TEACHER = {
    "--model": "cdl_lightning.models.PromptLearner",
    "--model.backbone": TEACHER_BACKBONE,
    "--model.prompt": "cdl_lightning.nn.prompts.CodaPrompt",
    "--model.prompt.pool_size": 10,
    "--model.prompt.length": 4,
    "--model.prompt.layers": "[0, 1]",
}


def student(method: str, teacher_checkpoint: Path) -> dict[str, object]:
    return {
        "--model": "cdl_lightning.models.Distiller",
        "--model.backbone": TINY_BACKBONE,
        "--model.prompt": "cdl_lightning.nn.prompts.L2P",
        "--model.prompt.pool_size": 6,
        "--model.prompt.top_k": 2,
        "--model.method": f"cdl_lightning.nn.{method}",
        "--model.teacher_checkpoint": teacher_checkpoint,
    }


def full_distiller(method: DistillationMethod, teacher_checkpoint: Path, checkpoint: Path) -> Distiller:
    """The student as training builds it (teacher and training-only parts included), with the run's final state."""
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    hp = ckpt["hyper_parameters"]
    model = Distiller(method=method, teacher_checkpoint=str(teacher_checkpoint), backbone=hp["backbone"],
                      prompt=functools.partial(L2P, pool_size=6, top_k=2), task_schedule=hp["task_schedule"])
    model.on_load_checkpoint(ckpt)
    model.load_state_dict(ckpt["state_dict"], strict=False)
    return model.eval()


@pytest.fixture(scope="module")
def moved_teacher(tmp_path_factory) -> SimpleNamespace:
    """A teacher run, a KDP and a FitNets student taught by it; then the teacher's run folder is moved away."""
    root = tmp_path_factory.mktemp("deploy")
    runs = root / "runs"
    cli_main(["fit", *run_args(runs, "teacher", TEACHER)])
    teacher_ckpt = runs / "teacher" / "checkpoints" / "last.ckpt"
    images = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    reference = {}
    for method, instance in (("KDP", KDP()), ("FitNets", FitNets())):
        cli_main(["fit", *run_args(runs, f"student_{method}", student(method, teacher_ckpt))])
        full = full_distiller(instance, teacher_ckpt, runs / f"student_{method}" / "checkpoints" / "last.ckpt")
        assert full.teacher is not None
        with torch.no_grad():
            reference[method] = full(images)
        reference[f"{method}_state"] = set(full.state_dict())
    moved = root / "elsewhere" / "teacher"
    shutil.move(str(runs / "teacher"), str(moved))
    assert not teacher_ckpt.exists()
    return SimpleNamespace(runs=runs, teacher_ckpt=teacher_ckpt, moved=moved, images=images, reference=reference)


@pytest.mark.parametrize("method", ["KDP", "FitNets"])
def test_load_for_inference_needs_no_teacher(moved_teacher, method):
    run = moved_teacher.runs / f"student_{method}"
    model = Distiller.load_for_inference(run)  # a run folder: its checkpoints/last.ckpt
    assert isinstance(model, Distiller) and model.inference_only and model.teacher is None
    assert not model.training and model.current_task == 1
    with torch.no_grad():
        assert torch.equal(model(moved_teacher.images), moved_teacher.reference[method])
    state = set(model.state_dict())
    if method == "KDP":  # KD token, KD prefixes and KD head are inference parts: all there
        assert state == moved_teacher.reference["KDP_state"]
        assert {"method.token", "method.prefixes", "method.kd_head.weight"} <= state
    else:  # the FitNets adapter only serves the training loss: left out
        assert moved_teacher.reference["FitNets_state"] - state == {"method.adapter.weight", "method.adapter.bias"}
    with pytest.raises(RuntimeError, match="inference_only=True"):
        model.setup("fit")


def test_cdl_validate_and_predict_without_the_teacher_file(moved_teacher, tmp_path):
    runs, images_dir = moved_teacher.runs, tmp_path / "images"
    images_dir.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(images_dir / f"{i}.png")
    options = run_args(runs, "student_KDP", student("KDP", moved_teacher.teacher_ckpt))  # the run's own options
    checkpoint = str(runs / "student_KDP" / "checkpoints" / "last.ckpt")
    out = tmp_path / "validate"
    cli_main(["validate", *options, "--ckpt_path", checkpoint, "--trainer.logger", "false",
              "--trainer.default_root_dir", str(tmp_path), "--evaluation.output_dir", str(out)])
    fitted = json.loads((runs / "student_KDP" / "metrics.json").read_text())
    validated = json.loads((out / "metrics.json").read_text())
    assert validated["accuracy_matrix"][1] == fitted["accuracy_matrix"][1]  # the fit's last row, exactly
    cli_main(["predict", *options, "--ckpt_path", checkpoint, "--data.predict_root", str(images_dir)])
    rows = list(csv.DictReader(open(runs / "student_KDP" / "predictions.csv")))
    assert sorted(r["file"].split("/")[-1] for r in rows) == ["0.png", "1.png", "2.png"]
    # fitting still needs the teacher, and says which file is missing
    with pytest.raises(Exception, match="teacher checkpoint .* does not exist"):  # jsonargparse re-raises it
        cli_main(["fit", *options])


def test_teacher_run_used_as_a_model(moved_teacher, tmp_path):
    """The teacher's run, moved to another folder, serves as a model from its checkpoint alone."""
    checkpoint = moved_teacher.moved / "checkpoints" / "last.ckpt"
    model = PromptLearner.load_for_inference(checkpoint)
    assert type(model) is PromptLearner and model.current_task == 1
    out = tmp_path / "validate"
    cli_main(["validate", *run_args(tmp_path / "runs", "teacher", TEACHER), "--ckpt_path", str(checkpoint),
              "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path),
              "--evaluation.output_dir", str(out)])
    fitted = json.loads((moved_teacher.moved / "metrics.json").read_text())
    assert json.loads((out / "metrics.json").read_text())["accuracy_matrix"][1] == fitted["accuracy_matrix"][1]
    with pytest.raises(TypeError, match="holds a PromptLearner, not a Distiller"):
        Distiller.load_for_inference(checkpoint)
