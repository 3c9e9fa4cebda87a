"""A run stopped mid-task and resumed with ``--ckpt_path`` ends with the accuracy matrix of an uninterrupted run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from _cli_helpers import TINY_BACKBONE, as_args, cpu_run_options

from cdl_lightning.cli import cli_main


def args_for(save_dir: Path, *extra: str) -> list[str]:
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


def matrix(save_dir: Path) -> list:
    return json.loads((save_dir / "run" / "metrics.json").read_text())["accuracy_matrix"]


def test_resume_mid_task_gives_the_same_matrix(tmp_path):
    full = tmp_path / "full"
    cli_main(args_for(full))
    # stop in the middle of task 1 (4 steps per epoch, 2 epochs per task: task 1 runs steps 8-15), a step checkpoint
    # every step (never one on an epoch's last batch here: step 10 is the second batch of epoch 2)
    part = tmp_path / "part"
    cli_main(
        args_for(
            part,
            "--trainer.max_steps",
            "10",
            "--checkpoint.every_n_train_steps",
            "1",
            "--checkpoint.every_n_epochs",
            "0",
        )
    )
    checkpoint = part / "run" / "checkpoints" / "last.ckpt"
    state = torch.load(checkpoint, weights_only=False)
    assert state["global_step"] == 10 and state["cdl"]["opened_task"] == 1
    rows = json.loads((part / "run" / "metrics.json").read_text())["filled_rows"]
    assert rows == [0]
    # the run folder moved elsewhere (last.ckpt is a real file, not a link into the old folder)
    moved = tmp_path / "moved"
    shutil.copytree(part, moved)
    shutil.rmtree(part)
    checkpoint = moved / "run" / "checkpoints" / "last.ckpt"
    assert checkpoint.is_file() and not checkpoint.is_symlink()
    cli_main(args_for(moved, "--ckpt_path", str(checkpoint)))
    resumed, uninterrupted = matrix(moved), matrix(full)
    assert len(uninterrupted) == 3 and all(v is not None for v in uninterrupted[2])
    assert resumed == uninterrupted
