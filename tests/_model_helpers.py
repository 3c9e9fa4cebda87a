"""Helpers shared by the model tests: the task-loop trainer and the accuracy-matrix check against the model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader

from cdl_lightning.data import ContinualDataModule

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


def assert_full_matrix(matrix: torch.Tensor, model: torch.nn.Module, data: ContinualDataModule) -> None:
    """The matrix a fit of ``model`` on ``data`` must have produced: ``NaN`` above the diagonal; every seen-task entry
    ``R[t, j], j <= t`` is a count of correct test images of task ``j`` in percent (``100 k / n_j``, ``k`` integer);
    and the last row equals the per-task accuracies recomputed here, independently of the callback and its metric,
    from the fitted model's own predictions on the test data of every task."""
    lower = torch.tril(torch.ones(NUM_TASKS, NUM_TASKS, dtype=torch.bool))
    assert matrix.shape == (NUM_TASKS, NUM_TASKS)
    assert torch.isnan(matrix[~lower]).all(), matrix
    dataset = data.task_dataset("test", list(range(NUM_TASKS)))
    correct, total = torch.zeros(NUM_TASKS, dtype=torch.long), torch.zeros(NUM_TASKS, dtype=torch.long)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for images, targets, task_ids in DataLoader(dataset, batch_size=data.eval_batch_size, shuffle=False):
            preds = model(data.preprocess(images, train=False), NUM_TASKS - 1).argmax(1)
            correct += torch.bincount(task_ids[preds == targets], minlength=NUM_TASKS)
            total += torch.bincount(task_ids, minlength=NUM_TASKS)
    model.train(was_training)
    for t in range(NUM_TASKS):
        for j in range(t + 1):
            count = matrix[t, j].item() * total[j].item() / 100
            assert abs(count - round(count)) < 1e-6, (t, j, matrix)
    expected = (100.0 * correct / total).tolist()
    assert matrix[-1].tolist() == pytest.approx(expected, abs=1e-9), (matrix, expected)
