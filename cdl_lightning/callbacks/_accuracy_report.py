"""Rendering of an accuracy matrix: CSV text, JSON-safe values, a heatmap image and a rich table.

Helpers of :class:`~cdl_lightning.callbacks.continual_evaluation.ContinualEvaluation`; pure functions of the matrix
(``T x T`` float array, ``NaN`` where empty) and the summary dict, with no Lightning dependency. Metric names, columns
and formulas come from `cdl_lightning.metrics.MATRIX_METRICS`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
from rich.markup import escape
from rich.table import Table

from cdl_lightning.metrics.functional import MATRIX_METRICS

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["accuracy_matrix_csv", "heatmap_title", "json_safe", "render_heatmap", "summary_table"]


def json_safe(value: Any) -> Any:
    """Recursively replace non-finite floats by ``None`` so that ``json.dump(..., allow_nan=False)`` works."""
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def accuracy_matrix_csv(matrix: np.ndarray) -> str:
    """CSV text of the matrix: header ``after_task,task_0,...``, one row per task, empty cells for ``NaN``.

    Values are written with ``repr`` (shortest exact round trip of the float64).
    """
    num_tasks = matrix.shape[0]
    lines = [",".join(["after_task"] + [f"task_{j}" for j in range(num_tasks)])]
    for t in range(num_tasks):
        cells = [repr(float(v)) if math.isfinite(v) else "" for v in matrix[t]]
        lines.append(",".join([str(t), *cells]))
    return "\n".join(lines) + "\n"


def heatmap_title(t: int, final: dict[str, Any]) -> str:
    """``"after task t: avg acc 80.00, forgetting 5.00, ..."``: every metric, values from ``summary["final"]``."""
    values = ", ".join(f"{metric.column} {final[metric.key]:.2f}" for metric in MATRIX_METRICS)
    return f"after task {t}: {values}"


def _heatmap_figure(matrix: np.ndarray, title: str) -> Figure:
    # Build the figure without pyplot: no global state, no GUI backend, safe in worker processes.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    num_tasks = matrix.shape[0]
    size = min(max(3.0 + 0.45 * num_tasks, 4.0), 14.0)
    figure = Figure(figsize=(size + 1.0, size), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    image = axes.imshow(np.ma.masked_invalid(matrix), vmin=0.0, vmax=100.0, cmap="viridis")
    figure.colorbar(image, ax=axes, label="accuracy (%)")
    if num_tasks <= 20:
        for t in range(num_tasks):
            for j in range(num_tasks):
                if math.isfinite(matrix[t, j]):
                    colour = "black" if matrix[t, j] > 60.0 else "white"
                    axes.text(j, t, f"{matrix[t, j]:.1f}", ha="center", va="center", fontsize=8, color=colour)
    ticks = list(range(num_tasks))
    axes.set_xticks(ticks)
    axes.set_yticks(ticks)
    axes.set_xlabel("evaluated task j")
    axes.set_ylabel("after training task t")
    axes.set_title(title, fontsize=9)
    figure.tight_layout()
    return figure


def render_heatmap(matrix: np.ndarray, title: str = "", path: str | None = None) -> np.ndarray:
    """Render the heatmap of the matrix, optionally save it to ``path`` (e.g. ``.png``).

    Returns:
        The image as an ``H x W x 3`` uint8 RGB array (for ``SummaryWriter.add_image(..., dataformats="HWC")``).
    """
    figure = _heatmap_figure(matrix, title)
    figure.canvas.draw()
    if path is not None:
        figure.savefig(path)
    return np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()


def _fmt(value: float) -> str:
    return f"{value:.2f}" if math.isfinite(value) else "-"


def summary_table(matrix: np.ndarray, curves: dict[str, list[float]]) -> Table:
    """A rich table: one line per filled row ``t`` with ``R[t, 0..t]`` and that row's metrics."""
    num_tasks = matrix.shape[0]
    table = Table(title="Continual evaluation: accuracy (%) on task j after training task t")
    table.add_column("t \\ j", justify="right", style="bold")
    for j in range(num_tasks):
        table.add_column(str(j), justify="right")
    for metric in MATRIX_METRICS:
        table.add_column(metric.column, justify="right", style="cyan")
    for t in range(num_tasks):
        if not np.isfinite(matrix[t]).any():
            continue
        cells = [_fmt(v) if j <= t else "" for j, v in enumerate(matrix[t])]
        metrics = [_fmt(curves[metric.key][t]) for metric in MATRIX_METRICS]
        table.add_row(str(t), *cells, *metrics)
    table.caption = escape("; ".join(f"{metric.column}: {metric.formula}" for metric in MATRIX_METRICS))
    return table
