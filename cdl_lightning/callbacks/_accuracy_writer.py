"""Writing an accuracy matrix out: ``accuracy_matrix.csv``, ``metrics.json``, ``accuracy_matrix.png``, the TensorBoard
image and the rich table. Part of `ContinualEvaluation`, which calls it on global rank zero only."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from lightning.pytorch.loggers import Logger, TensorBoardLogger

from cdl_lightning.callbacks._accuracy_matrix import AccuracyMatrix
from cdl_lightning.callbacks._accuracy_report import (
    accuracy_matrix_csv,
    heatmap_title,
    json_safe,
    render_heatmap,
    summary_table,
)

__all__ = ["AccuracyReportWriter"]


class AccuracyReportWriter:
    """Write the files of one evaluation and show the matrix.

    Args:
        print_table: print a rich table of the matrix.
        log_image: save ``accuracy_matrix.png`` and add the heatmap to the TensorBoard loggers.
        image_tag: TensorBoard tag of the heatmap.
    """

    def __init__(self, print_table: bool = True, log_image: bool = True, image_tag: str = "cl/accuracy_matrix") -> None:
        self.print_table, self.log_image, self.image_tag = print_table, log_image, image_tag

    def write(
        self,
        output_dir: str,
        matrix: AccuracyMatrix,
        summary: dict[str, Any],
        task: int,
        loggers: Sequence[Logger] = (),
        global_step: int = 0,
    ) -> None:
        """Write ``accuracy_matrix.csv`` and ``metrics.json`` (``summary``) to ``output_dir``; then the heatmap
        (file and TensorBoard, titled after row ``task``) and the table when enabled."""
        os.makedirs(output_dir, exist_ok=True)
        values = matrix.values.numpy()
        with open(os.path.join(output_dir, "accuracy_matrix.csv"), "w") as file:
            file.write(accuracy_matrix_csv(values))
        self.write_summary(output_dir, summary)
        if self.log_image:
            title = heatmap_title(task, summary["final"])
            image = render_heatmap(values, title, os.path.join(output_dir, "accuracy_matrix.png"))
            for logger in loggers:
                if isinstance(logger, TensorBoardLogger):
                    logger.experiment.add_image(self.image_tag, image, global_step=global_step, dataformats="HWC")
        if self.print_table:
            from rich import get_console

            get_console().print(summary_table(values, summary["curves"]))

    @staticmethod
    def write_summary(output_dir: str, summary: dict[str, Any]) -> None:
        """Write ``metrics.json`` (``summary``, non-finite values as ``null``) to ``output_dir``."""
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, "metrics.json"), "w") as file:
            json.dump(json_safe(summary), file, indent=2, allow_nan=False)
