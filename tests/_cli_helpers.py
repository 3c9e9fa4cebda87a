"""Helpers shared by the tests that drive `cdl` through ``cli_main``: a tiny backbone and option lists."""

from __future__ import annotations

import json
from pathlib import Path

TINY_BACKBONE = json.dumps({
    "name": "vit_tiny_patch16_224",
    "pretrained": False,
    "model_kwargs": {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 3, "num_heads": 2},
})


def cpu_run_options(save_dir: Path, name: str) -> dict[str, object]:
    """A seeded CPU run without progress bar, logged by TensorBoard to ``save_dir/name`` (no version folder), on
    the built-in synthetic data."""
    return {
        "--seed_everything": 0,
        "--trainer.accelerator": "cpu",
        "--trainer.enable_progress_bar": "false",
        "--trainer.logger": "lightning.pytorch.loggers.TensorBoardLogger",
        "--trainer.logger.save_dir": save_dir,
        "--trainer.logger.name": name,
        "--trainer.logger.version": "",
        "--data.source": "cdl_lightning.data.SyntheticShapes",
    }


def as_args(options: dict[str, object]) -> list[str]:
    """``{"--key": value}`` (in order) as a ``cli_main`` argument list."""
    return [part for key, value in options.items() for part in (key, str(value))]


def small_coda_fit_args(save_dir: Path, *extra: str) -> list[str]:
    """``cdl fit`` of a small CODA-Prompt learner on 6 synthetic classes: 3 tasks x 2 epochs of 4 batches of 6, logged
    to ``save_dir/run``; ``extra`` options follow (e.g. ``--data.device_data true``, ``--ckpt_path ...``)."""
    return ["fit", *as_args({
        **cpu_run_options(save_dir, "run"),
        "--trainer.limit_train_batches": 4,
        "--trainer.enable_model_summary": "false",
        "--data.source.num_classes": 6,
        "--data.source.train_per_class": 12,
        "--data.source.test_per_class": 5,
        "--data.num_tasks": 3,
        "--data.epochs_per_task": 2,
        "--data.batch_size": 6,
        "--data.image_size": 32,
        "--model": "cdl_lightning.models.PromptLearner",
        "--model.backbone": TINY_BACKBONE,
        "--model.prompt": "cdl_lightning.nn.prompts.CodaPrompt",
        "--model.prompt.pool_size": 12,
        "--model.prompt.layers": "[0, 1]",
        "--evaluation.print_table": "false",
        "--evaluation.log_image": "false",
    }), *extra]


def run_matrix(save_dir: Path) -> list:
    """The accuracy matrix in ``save_dir/run/metrics.json`` (``None`` for empty cells)."""
    return json.loads((save_dir / "run" / "metrics.json").read_text())["accuracy_matrix"]


def two_task_run_options(save_dir: Path, name: str) -> dict[str, object]:
    """`cpu_run_options` of a quick run: 6 synthetic classes in 2 tasks, one epoch per task of two batches of 4
    (8 train / 4 test images per class), 32 px, no table printed; add the model options."""
    return {
        **cpu_run_options(save_dir, name),
        "--trainer.limit_train_batches": 2,
        "--data.source.num_classes": 6,
        "--data.source.train_per_class": 8,
        "--data.source.test_per_class": 4,
        "--data.num_tasks": 2,
        "--data.epochs_per_task": 1,
        "--data.batch_size": 4,
        "--data.image_size": 32,
        "--evaluation.print_table": "false",
    }


def teacher_checkpoint_file(teacher, directory: Path | str) -> str:
    """Save ``teacher`` (a `PromptLearner`) as a finished run's checkpoint as Lightning writes it: every task opened
    and snapshotted (its prompts as they are), ``state_dict``, ``hyper_parameters`` and the ``cdl`` entry of
    ``on_save_checkpoint``; the file's path (``directory/teacher.ckpt``). The GPU suite uses it too."""
    import torch

    for task in range(len(teacher.task_schedule.task_sizes)):
        teacher.open_task(task)
        teacher.snapshot_task(task)
    checkpoint = {"state_dict": teacher.state_dict(), "hyper_parameters": dict(teacher.hparams)}
    teacher.on_save_checkpoint(checkpoint)
    path = Path(directory) / "teacher.ckpt"
    torch.save(checkpoint, path)
    return str(path)
