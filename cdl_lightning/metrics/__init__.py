"""Continual-learning metrics: per-task accuracy (torchmetrics) and functional metrics on the accuracy matrix."""

from cdl_lightning.metrics.functional import (
    MATRIX_METRICS,
    MatrixMetric,
    accuracy_matrix_to_numpy,
    average_accuracy,
    backward_transfer,
    forgetting,
    last_filled_row,
    metric_curves,
    per_task_accuracy,
    reference_forgetting,
)
from cdl_lightning.metrics.task_accuracy import TaskAccuracy

__all__ = [
    "MATRIX_METRICS",
    "MatrixMetric",
    "TaskAccuracy",
    "accuracy_matrix_to_numpy",
    "average_accuracy",
    "backward_transfer",
    "forgetting",
    "last_filled_row",
    "metric_curves",
    "reference_forgetting",
    "per_task_accuracy",
]
