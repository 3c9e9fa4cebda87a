"""`AccuracyMatrix`: the rows ``R[t, :]`` of a continual run, filled from per-task counts; pure and checkpointable.

Part of `ContinualEvaluation` (which decides *when* and *which* row is filled); no Lightning here.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from cdl_lightning.metrics.functional import MATRIX_METRICS, _task_accuracy_compute, metric_curves

__all__ = ["AccuracyMatrix"]


class AccuracyMatrix:
    """The ``T x T`` float64 accuracy matrix in %: ``R[t, j]`` = accuracy on task ``j`` after training task ``t``;
    ``NaN`` above the diagonal and in rows not evaluated yet.

    Args:
        num_tasks: number of tasks ``T`` (>= 1).
    """

    def __init__(self, num_tasks: int) -> None:
        if num_tasks < 1:
            raise ValueError(f"`num_tasks` must be a positive integer, got {num_tasks}.")
        self.num_tasks = num_tasks
        self.values = torch.full((num_tasks, num_tasks), math.nan, dtype=torch.float64)
        self.filled = [False] * num_tasks
        self.last_counts: dict[str, Any] | None = None
        """``{"task": t, "correct": [...], "total": [...]}``: the global per-task counts behind the last row."""

    @property
    def filled_rows(self) -> list[int]:
        """Indices ``t`` of the rows that were evaluated."""
        return [t for t, filled in enumerate(self.filled) if filled]

    def fill_row(self, t: int, correct: Tensor, total: Tensor) -> Tensor:
        """Row ``t`` from per-task counts (``correct``, ``total``: ``(T,)``): ``R[t, j]`` for ``j <= t``, ``NaN``
        after (later tasks' samples, if any, are ignored). Replaces an earlier value of the row; returns the row."""
        if not 0 <= t < self.num_tasks:
            raise IndexError(f"row {t} out of range for an accuracy matrix over {self.num_tasks} tasks")
        correct, total = correct.detach().cpu().double(), total.detach().cpu().double()
        accuracy = _task_accuracy_compute(correct, total)
        row = torch.full((self.num_tasks,), math.nan, dtype=torch.float64)
        row[: t + 1] = accuracy[: t + 1]
        self.values[t] = row
        self.filled[t] = True
        self.last_counts = {"task": t, "correct": correct.long().tolist(), "total": total.long().tolist()}
        return row.clone()

    def curves(self) -> dict[str, list[float]]:
        """Every `MATRIX_METRICS` entry for every row (``NaN`` for rows not evaluated)."""
        return metric_curves(self.values)

    def summary(self, epochs_per_task: int | None = None) -> dict[str, Any]:
        """What ``metrics.json`` holds: ``num_tasks``, ``epochs_per_task``, ``filled_rows``, ``accuracy_matrix``
        (nested lists), ``curves`` (one value per row for each metric key), ``final`` (``task``: last filled row or
        ``None``, and each metric of that row) and ``last_evaluation`` (`last_counts`, to audit exactness)."""
        curves = self.curves()
        rows = self.filled_rows
        last = rows[-1] if rows else None
        final: dict[str, Any] = {"task": last}
        final.update({m.key: curves[m.key][last] if last is not None else math.nan for m in MATRIX_METRICS})
        return {
            "num_tasks": self.num_tasks,
            "epochs_per_task": epochs_per_task,
            "filled_rows": rows,
            "accuracy_matrix": self.values.tolist(),
            "curves": curves,
            "final": final,
            "last_evaluation": self.last_counts,
        }

    def state_dict(self) -> dict[str, Any]:
        """Plain Python lists, floats (NaN allowed) and bools: loadable with ``torch.load(weights_only=True)``."""
        return {"num_tasks": self.num_tasks, "matrix": self.values.tolist(), "filled": list(self.filled)}

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, Any]) -> AccuracyMatrix:
        """Inverse of `state_dict`."""
        num_tasks = int(state_dict["num_tasks"])
        values = torch.tensor(state_dict["matrix"], dtype=torch.float64)
        if values.shape != (num_tasks, num_tasks) or len(state_dict["filled"]) != num_tasks:
            raise ValueError(f"Malformed ContinualEvaluation state: matrix of shape {tuple(values.shape)}.")
        matrix = cls(num_tasks)
        matrix.values = values
        matrix.filled = [bool(f) for f in state_dict["filled"]]
        return matrix
