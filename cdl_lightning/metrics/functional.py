"""Continual-learning metrics on an accuracy matrix.

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
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = [
    "accuracy_matrix_to_numpy",
    "average_accuracy",
    "backward_transfer",
    "forgetting",
    "last_filled_row",
    "metric_curves",
    "reference_forgetting",
]


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


def metric_curves(matrix: Any) -> dict[str, list[float]]:
    """Every metric of this module for every row of ``matrix``.

    Args:
        matrix: ``T x T`` accuracy matrix (see module docstring).

    Returns:
        ``{"avg_acc", "forgetting", "ref_forgetting", "bwt"}`` -> list of ``T`` floats (``NaN`` for unfilled rows).
    """
    array = accuracy_matrix_to_numpy(matrix)
    filled = np.isfinite(array).any(axis=1)
    functions = {
        "avg_acc": average_accuracy,
        "forgetting": forgetting,
        "ref_forgetting": reference_forgetting,
        "bwt": backward_transfer,
    }
    return {
        name: [fn(array, t) if filled[t] else math.nan for t in range(array.shape[0])] for name, fn in functions.items()
    }
