"""Helpers shared by the model tests: the task-loop trainer and the accuracy-matrix shape check."""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch import Trainer

NUM_TASKS = 2
EPOCHS_PER_TASK = 2


def make_trainer(
    root: Path, epochs_per_task: int = EPOCHS_PER_TASK, callbacks: list | None = None, **kwargs: object
) -> Trainer:
    return Trainer(
        accelerator="cpu",
        max_epochs=NUM_TASKS * epochs_per_task,
        check_val_every_n_epoch=epochs_per_task,
        reload_dataloaders_every_n_epochs=1,
        num_sanity_val_steps=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        callbacks=callbacks or [],
        **kwargs,
    )


def assert_full_matrix(matrix: torch.Tensor) -> None:
    """Every seen-task entry ``R[t, j], j <= t`` is a percentage; the upper triangle is NaN."""
    lower = torch.tril(torch.ones(NUM_TASKS, NUM_TASKS, dtype=torch.bool))
    assert matrix.shape == (NUM_TASKS, NUM_TASKS)
    assert torch.isfinite(matrix[lower]).all(), matrix
    assert ((matrix[lower] >= 0) & (matrix[lower] <= 100)).all(), matrix
    assert torch.isnan(matrix[~lower]).all(), matrix
