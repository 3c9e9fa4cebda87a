"""Continual-learning metrics: per-task accuracy from predictions, and the metrics of an accuracy matrix.

Per-task accuracy follows torchmetrics' functional pattern: `_task_accuracy_update` turns a batch into per-task counts,
`_task_accuracy_compute` turns summed counts into accuracies; `TaskAccuracy` (the stateful, DDP-summed metric) and
`ContinualEvaluation` both use them, and `per_task_accuracy` does both for one batch.

The accuracy-matrix metrics are listed once in `MATRIX_METRICS` (key, label, table column, formula, function):
the callback's logged scalars, ``metrics.json`` curves, the rich table, the heatmap title and ``cdl compare`` all
read that list, so adding a metric is one function and one entry here.

All functions take the accuracy matrix ``R`` of a run over ``T`` tasks: a ``T x T`` array (torch tensor, numpy array
or nested lists) where ``R[t, j]`` is the accuracy (any unit, usually %) on the test set of task ``j`` measured after
training task ``t``. Entries above the diagonal (``j > t``) and rows that were never evaluated are ``NaN``.

``t`` selects the row ("after training task t") a metric is computed for; by default the last row that holds any
finite value. Every function returns a Python ``float``; ``NaN`` when the row needed is missing.

Summary of the formulas (``t`` is the row, ``j`` a task; means are unweighted over tasks):

- average accuracy       ``A_t   = 1/(t+1) * sum_{j<=t} R[t, j]``
- forgetting (Chaudhry)  ``F_t   = 1/t * sum_{j<t} (max_{l<t} R[l, j] - R[t, j])``
- reference forgetting   ``F^r_t = 1/(t+1) * sum_{j<=t} (R[j, j] - R[t, j])``   (CDL / CODA-Prompt code)
- backward transfer      ``BWT_t = 1/t * sum_{j<t} (R[t, j] - R[j, j])``

so ``F^r_t = -BWT_t * t / (t+1)``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "MATRIX_METRICS",
    "MatrixMetric",
    "accuracy_matrix_to_numpy",
    "average_accuracy",
    "backward_transfer",
    "forgetting",
    "last_filled_row",
    "metric_curves",
    "reference_forgetting",
    "per_task_accuracy",
]


# ------------------------------------------------------------------------------------------------ per-task accuracy
def _task_accuracy_update(
    preds_or_logits: Tensor, targets: Tensor, task_ids: Tensor, num_tasks: int, validate_args: bool = True
) -> tuple[Tensor, Tensor]:
    """Per-task ``(correct, total)`` int64 counts ``(num_tasks,)`` of one batch, on the device of ``targets``.

    Args:
        preds_or_logits: ``(B, C)`` logits or scores (the prediction is their ``argmax``) or ``(B,)`` class predictions.
        targets: ``(B,)`` integer class labels.
        task_ids: ``(B,)`` integer task id of each sample, in ``[0, num_tasks)``.
        num_tasks: number of tasks ``T``.
        validate_args: check shapes, dtypes and the task-id range (one device sync).
    """
    preds = preds_or_logits.argmax(dim=-1) if preds_or_logits.ndim == 2 else preds_or_logits
    device = targets.device
    preds, task_ids = preds.to(device), task_ids.to(device)
    if validate_args:
        _check_task_accuracy_args(preds, targets, task_ids, num_tasks)
    hits = preds == targets
    # (B, T) membership mask: deterministic, device-agnostic and sync-free (no scatter, no bincount).
    member = task_ids.long().unsqueeze(1) == torch.arange(num_tasks, device=device)
    return (member & hits.unsqueeze(1)).sum(dim=0), member.sum(dim=0)


def _check_task_accuracy_args(preds: Tensor, targets: Tensor, task_ids: Tensor, num_tasks: int) -> None:
    if preds.ndim != 1 or targets.ndim != 1 or task_ids.ndim != 1:
        raise ValueError(
            "Expected logits (B, C) or predictions (B,), targets (B,) and task_ids (B,); got shapes "
            f"{tuple(preds.shape)} (after argmax), {tuple(targets.shape)}, {tuple(task_ids.shape)}."
        )
    if not preds.shape[0] == targets.shape[0] == task_ids.shape[0]:
        raise ValueError(
            f"Batch sizes differ: preds {preds.shape[0]}, targets {targets.shape[0]}, task_ids {task_ids.shape[0]}."
        )
    if task_ids.is_floating_point() or targets.is_floating_point():
        raise ValueError("`targets` and `task_ids` must be integer tensors.")
    if task_ids.numel() and bool(((task_ids < 0) | (task_ids >= num_tasks)).any()):
        raise ValueError(
            f"Task ids must lie in [0, {num_tasks}); got values in [{int(task_ids.min())}, {int(task_ids.max())}]."
        )


def _task_accuracy_compute(correct: Tensor, total: Tensor) -> Tensor:
    """Per-task accuracy in percent, ``100 * correct / total``; ``NaN`` for tasks without samples.

    Floating-point counts keep their dtype (the callback passes float64), integer counts give float32.
    """
    dtype = correct.dtype if correct.is_floating_point() else torch.float32
    correct, total_f = correct.to(dtype), total.to(dtype)
    return torch.where(total > 0, 100.0 * correct / total_f.clamp_min(1), torch.full_like(correct, torch.nan))


def per_task_accuracy(preds_or_logits: Tensor, targets: Tensor, task_ids: Tensor, num_tasks: int) -> Tensor:
    """Top-1 accuracy (%) of each task on one batch: ``(num_tasks,)`` float32, ``NaN`` for tasks without samples.

    Example:
        >>> per_task_accuracy(torch.tensor([1, 0, 3]), torch.tensor([1, 1, 3]), torch.tensor([0, 0, 1]), num_tasks=2)
        tensor([ 50., 100.])
    """
    return _task_accuracy_compute(*_task_accuracy_update(preds_or_logits, targets, task_ids, num_tasks))


# ------------------------------------------------------------------------------------------ accuracy-matrix metrics


def accuracy_matrix_to_numpy(matrix: torch.Tensor | np.ndarray | Sequence[Sequence[float | None]]) -> np.ndarray:
    """Convert an accuracy matrix to a square ``float64`` numpy array (``None`` becomes ``NaN``).

    Args:
        matrix: ``T x T`` accuracy matrix as a torch tensor (any device or dtype), numpy array or nested lists.

    Returns:
        A new ``float64`` array of shape ``(T, T)``.

    Raises:
        ValueError: if the matrix is not square and two-dimensional.
    """
    if isinstance(matrix, torch.Tensor):
        array = matrix.detach().to("cpu", torch.float64).numpy().copy()
    else:
        array = np.array(matrix, dtype=np.float64)  # None -> nan
    if array.ndim != 2 or array.shape[0] != array.shape[1]:
        raise ValueError(f"The accuracy matrix must be square (T x T), got shape {tuple(array.shape)}.")
    return array


def last_filled_row(matrix: Any) -> int | None:
    """Index of the last row of ``matrix`` that holds at least one finite value, or ``None`` if there is none."""
    array = accuracy_matrix_to_numpy(matrix)
    rows = np.flatnonzero(np.isfinite(array).any(axis=1))
    return int(rows[-1]) if rows.size else None


def _resolve_row(array: np.ndarray, t: int | None) -> int | None:
    if t is None:
        return last_filled_row(array)
    num_tasks = array.shape[0]
    if not -num_tasks <= t < num_tasks:
        raise IndexError(f"Row t={t} is out of range for an accuracy matrix over {num_tasks} tasks.")
    return t % num_tasks


def average_accuracy(matrix: Any, t: int | None = None) -> float:
    """Average accuracy over the tasks seen after training task ``t``.

    ``A_t = 1/(t+1) * sum_{j=0..t} R[t, j]``: the unweighted mean over tasks (every task counts the same whatever
    the size of its test set), as reported by the CODA-Prompt / CDL reference code (Smith et al., CVPR 2023; Zhang
    et al., 2024) and most prompt-based continual-learning papers. ``A_{T-1}`` is the "final average accuracy".

    Args:
        matrix: ``T x T`` accuracy matrix (see module docstring).
        t: row to evaluate; defaults to the last filled row.

    Returns:
        The average accuracy; ``NaN`` if the row (or one of its entries ``j <= t``) is missing.
    """
    array = accuracy_matrix_to_numpy(matrix)
    row = _resolve_row(array, t)
    if row is None:
        return math.nan
    return float(np.mean(array[row, : row + 1]))


def forgetting(matrix: Any, t: int | None = None) -> float:
    """Average forgetting after training task ``t`` (Chaudhry et al., ECCV 2018, "Riemannian Walk").

    ``F_t = 1/t * sum_{j=0..t-1} (max_{l=0..t-1} R[l, j] - R[t, j])``: for every earlier task, the drop from its
    best accuracy before task ``t`` to its accuracy now, averaged over the ``t`` earlier tasks. Only rows that were
    evaluated enter the maximum (rows ``l < j`` are ``NaN`` anyway); a term whose maximum or current value is missing
    makes the result ``NaN``.

    For ``t = 0`` there is no earlier task and we return ``0.0`` (nothing can have been forgotten), so curves and
    logged scalars stay finite.

    Args:
        matrix: ``T x T`` accuracy matrix (see module docstring).
        t: row to evaluate; defaults to the last filled row.

    Returns:
        The forgetting (same unit as ``R``, positive means accuracy was lost); ``NaN`` if the row is missing.
    """
    array = accuracy_matrix_to_numpy(matrix)
    row = _resolve_row(array, t)
    if row is None:
        return math.nan
    if row == 0:
        return 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN column slice -> NaN, which is what we want
        best_before = np.nanmax(array[:row, :row], axis=0)
    return float(np.mean(best_before - array[row, :row]))


def reference_forgetting(matrix: Any, t: int | None = None) -> float:
    """Forgetting as computed by the CDL reference code (Zhang, Guo & Xiang, 2024, built on CODA-Prompt's trainer).

    ``F^r_t = 1/(t+1) * sum_{j=0..t} (R[j, j] - R[t, j])``

    The reference stores each task's accuracy right after learning it (``R[j, j]``), and after the last task prints
    ``sum_j (R[j, j] - R[T-1, j]) / T``; for an intermediate row we use the number of tasks seen, ``t + 1``. The
    ``j = t`` term is always zero. It differs from the standard :func:`forgetting` (Chaudhry et al.) in two ways:

    1. it compares with the just-learned accuracy ``R[j, j]``, not the best accuracy ``max_{l<t} R[l, j]``
       (so a task that improved after it was learned can give negative forgetting);
    2. it divides by ``t + 1`` (all tasks seen, the current one included) instead of ``t`` (earlier tasks only),
       which shrinks the value by a factor ``t / (t+1)`` (by 10% for 10 tasks).

    Equivalently ``F^r_t = -BWT_t * t / (t+1)``. Use it only to compare with numbers published from that code.
    (CODA-Prompt's own ``utils/calc_forgetting.py`` computes yet another, "incremental", forgetting.)

    Args:
        matrix: ``T x T`` accuracy matrix (see module docstring).
        t: row to evaluate; defaults to the last filled row.

    Returns:
        The reference forgetting; ``0.0`` for ``t = 0``; ``NaN`` if a needed entry is missing.
    """
    array = accuracy_matrix_to_numpy(matrix)
    row = _resolve_row(array, t)
    if row is None:
        return math.nan
    just_learned = np.diagonal(array)[: row + 1]
    return float(np.sum(just_learned - array[row, : row + 1]) / (row + 1))


def backward_transfer(matrix: Any, t: int | None = None) -> float:
    """Backward transfer after training task ``t`` (Lopez-Paz & Ranzato, NeurIPS 2017, "GEM").

    ``BWT_t = 1/t * sum_{j=0..t-1} (R[t, j] - R[j, j])``: how much learning the later tasks changed the accuracy on
    earlier ones, relative to the accuracy right after learning them; negative values mean forgetting.

    For ``t = 0`` there is no earlier task and we return ``0.0``.

    Args:
        matrix: ``T x T`` accuracy matrix (see module docstring).
        t: row to evaluate; defaults to the last filled row.

    Returns:
        The backward transfer; ``NaN`` if a needed entry is missing.
    """
    array = accuracy_matrix_to_numpy(matrix)
    row = _resolve_row(array, t)
    if row is None:
        return math.nan
    if row == 0:
        return 0.0
    return float(np.mean(array[row, :row] - np.diagonal(array)[:row]))


@dataclass(frozen=True)
class MatrixMetric:
    """One metric of the accuracy matrix, with every name it is shown under.

    Args:
        key: identifier: logged as ``cl/{key}``, the key in ``metrics.json`` (``curves`` and ``final``).
        label: words for titles and plots (``"average accuracy"``).
        column: short table column header (``"avg acc"``).
        formula: the formula in plain text, for table captions.
        fn: ``fn(matrix, t) -> float``, the metric of row ``t``.
    """

    key: str
    label: str
    column: str
    formula: str
    fn: Callable[[Any, int | None], float]


MATRIX_METRICS: tuple[MatrixMetric, ...] = (
    MatrixMetric("avg_acc", "average accuracy", "avg acc", "mean_j<=t R[t,j]", average_accuracy),
    MatrixMetric("forgetting", "forgetting", "forgetting",
                 "Chaudhry et al. mean_j<t (max_l<t R[l,j] - R[t,j])", forgetting),
    MatrixMetric("ref_forgetting", "reference forgetting", "ref. forgetting",
                 "CDL reference sum_j<=t (R[j,j] - R[t,j]) / (t+1)", reference_forgetting),
    MatrixMetric("bwt", "backward transfer", "BWT", "mean_j<t (R[t,j] - R[j,j])", backward_transfer),
)
"""Every accuracy-matrix metric, in display order: the one list that logging, files, tables and ``cdl compare`` use."""


def metric_curves(matrix: Any) -> dict[str, list[float]]:
    """Every metric of `MATRIX_METRICS` for every row of ``matrix``.

    Args:
        matrix: ``T x T`` accuracy matrix (see module docstring).

    Returns:
        ``{key: list of T floats}`` for every metric key (``avg_acc``, ``forgetting``, ``ref_forgetting``, ``bwt``),
        ``NaN`` for unfilled rows.
    """
    array = accuracy_matrix_to_numpy(matrix)
    filled = np.isfinite(array).any(axis=1)
    return {
        metric.key: [metric.fn(array, t) if filled[t] else math.nan for t in range(array.shape[0])]
        for metric in MATRIX_METRICS
    }
