"""A run stopped mid-task and resumed with ``--ckpt_path`` ends with the accuracy matrix of an uninterrupted run."""

from __future__ import annotations

import json
import shutil

import torch
from _cli_helpers import run_matrix as matrix
from _cli_helpers import small_coda_fit_args as args_for

from cdl_lightning.cli import cli_main


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
