"""Per-task top-1 accuracy as a torchmetrics ``Metric`` with exact distributed synchronisation."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from cdl_lightning.metrics.functional import _task_accuracy_compute, _task_accuracy_update

__all__ = ["TaskAccuracy"]


class TaskAccuracy(Metric):
    """Top-1 accuracy of each task, from per-task counts of correct and seen samples.

    The state is two integer count vectors summed across processes (``dist_reduce_fx="sum"``), so the accuracy
    computed under DDP is exactly the single-process one as long as every sample is evaluated once (use
    ``lightning.pytorch.overrides.distributed.UnrepeatedDistributedSampler`` for the evaluation loader).

    Example:
        >>> metric = TaskAccuracy(num_tasks=2)
        >>> metric.update(torch.tensor([1, 0, 3]), torch.tensor([1, 1, 3]), torch.tensor([0, 0, 1]))
        >>> metric.compute()
        tensor([ 50., 100.])

    Args:
        num_tasks: number of tasks ``T``; task ids must lie in ``[0, T)``.
        validate_args: check shapes and the task-id range on every update (one device sync per update).
        **kwargs: forwarded to :class:`torchmetrics.Metric` (``sync_on_compute``, ``process_group``, ...).

    Attributes:
        correct: ``(T,)`` int64 count of correctly classified samples of each task (local to this process until
            synchronised; use :meth:`counts` for the global counts).
        total: ``(T,)`` int64 count of evaluated samples of each task.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    correct: Tensor
    total: Tensor

    def __init__(self, num_tasks: int, validate_args: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if num_tasks < 1:
            raise ValueError(f"`num_tasks` must be a positive integer, got {num_tasks}.")
        self.num_tasks = num_tasks
        self.validate_args = validate_args
        self.add_state("correct", default=torch.zeros(num_tasks, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.zeros(num_tasks, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds_or_logits: Tensor, targets: Tensor, task_ids: Tensor) -> None:
        """Count one batch (see `_task_accuracy_update`).

        Args:
            preds_or_logits: ``(B, C)`` logits or scores (the prediction is their ``argmax`` over ``C``) or ``(B,)``
                integer class predictions.
            targets: ``(B,)`` integer class labels.
            task_ids: ``(B,)`` integer task id of each sample, in ``[0, num_tasks)``.
        """
        device = self.total.device
        correct, total = _task_accuracy_update(
            preds_or_logits, targets.to(device), task_ids, self.num_tasks, self.validate_args
        )
        self.correct += correct
        self.total += total

    def counts(self) -> tuple[Tensor, Tensor]:
        """Per-task ``(correct, total)`` counts, summed over all processes when running distributed.

        Must be called on every process under DDP (it is a collective operation, like :meth:`compute`).
        """
        with self.sync_context(
            dist_sync_fn=self.dist_sync_fn,
            process_group=self.process_group,
            should_sync=self.sync_on_compute,
        ):
            return self.correct.clone(), self.total.clone()

    def compute(self) -> Tensor:
        """Per-task accuracy in percent, ``100 * correct / total``; ``NaN`` for tasks without samples.

        Returns:
            ``(num_tasks,)`` float32 tensor.
        """
        return _task_accuracy_compute(self.correct, self.total)
