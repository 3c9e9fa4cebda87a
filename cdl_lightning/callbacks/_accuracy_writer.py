"""Writing an accuracy matrix out: ``accuracy_matrix.csv``, ``metrics.json``, ``accuracy_matrix.png``, the TensorBoard
image and the rich table. Part of `ContinualEvaluation`, which calls it on global rank zero only.

The files and the image (rendering the heatmap with matplotlib takes about half a second) are written by one background
thread, in the order they were asked for, so that rank zero goes back to training (and the other ranks stop waiting
for it at the next collective) at once; the table is printed at once, in order with the rest of the console output.
"""

from __future__ import annotations

import copy
import json
import os
import threading
from collections import deque
from collections.abc import Callable, Sequence
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

__all__ = ["AccuracyReportWriter", "BackgroundWriter"]


class BackgroundWriter:
    """Run jobs in order in one background thread; the first error a job raises is raised again by the next
    `submit` or `flush` in the calling thread (never lost).

    The thread lives only while jobs are pending (it ends when the queue is empty) and is not a daemon, so the process
    never exits with a file half written and never waits on an idle thread.

    Args:
        enabled: run jobs in the background; ``False`` runs each job at once in the calling thread.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._jobs: deque[Callable[[], None]] = deque()
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, job: Callable[[], None]) -> None:
        """Queue ``job`` (a function of no argument that owns copies of its data); raise a pending error first."""
        self.raise_pending()
        if not self.enabled:
            job()
            return
        with self._lock:
            self._jobs.append(job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="cdl-accuracy-writer", daemon=False)
                self._thread.start()

    def flush(self, raise_error: bool = True) -> BaseException | None:
        """Wait until every queued job ran. Raise the first error a job raised (``raise_error``), or return it."""
        with self._idle:
            while self._thread is not None and self._thread.is_alive():
                self._idle.wait(0.2)
            # a thread that never started (an interrupt between its creation and `start`) leaves its jobs queued
            self._thread, left = None, list(self._jobs)
            self._jobs.clear()
        for job in left:
            self._run(job)
        if raise_error:
            self.raise_pending()
        error, self._error = self._error, None
        return error

    def raise_pending(self) -> None:
        """Raise (once) the error of a job that failed since the last flush."""
        error, self._error = self._error, None
        if error is not None:
            raise RuntimeError(f"writing the evaluation's files failed: {error!r}") from error

    def _work(self) -> None:
        while True:
            with self._idle:
                if not self._jobs:
                    self._thread = None
                    self._idle.notify_all()
                    return
                job = self._jobs.popleft()
            self._run(job)

    def _run(self, job: Callable[[], None]) -> None:
        try:
            job()
        except BaseException as error:  # noqa: BLE001 - kept and raised again in the caller's thread
            with self._lock:
                if self._error is None:
                    self._error = error


def _write_text(path: str, text: str) -> None:
    # write next to the target, then rename: a reader (cdl compare, a sweep) never sees half a file
    temporary = f"{path}.tmp"
    with open(temporary, "w") as file:
        file.write(text)
    os.replace(temporary, path)


class AccuracyReportWriter:
    """Write the files of one evaluation and show the matrix.

    Args:
        print_table: print a rich table of the matrix (at once, in the calling thread).
        log_image: save ``accuracy_matrix.png`` and add the heatmap to the TensorBoard loggers.
        image_tag: TensorBoard tag of the heatmap.
        background: write the files and the image in a background thread (`BackgroundWriter`); call `flush` before
            reading them. ``False`` writes them before `write` returns.
    """

    def __init__(
        self,
        print_table: bool = True,
        log_image: bool = True,
        image_tag: str = "cl/accuracy_matrix",
        background: bool = True,
    ) -> None:
        self.print_table, self.log_image, self.image_tag = print_table, log_image, image_tag
        self._queue = BackgroundWriter(background)

    @property
    def background(self) -> bool:
        """Whether files are written by the background thread."""
        return self._queue.enabled

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
        (file and TensorBoard, titled after row ``task``) and the table when enabled. The matrix and the summary are
        copied first: changes made to them after this call are not written."""
        values = matrix.values.numpy().copy()
        summary = copy.deepcopy(summary)
        tensorboards = [logger for logger in loggers if isinstance(logger, TensorBoardLogger)] if self.log_image else []
        self._queue.submit(lambda: self._write_files(output_dir, values, summary, task, tensorboards, global_step))
        if self.print_table:
            from rich import get_console

            get_console().print(summary_table(values, summary["curves"]))

    def write_summary(self, output_dir: str, summary: dict[str, Any]) -> None:
        """Write ``metrics.json`` (``summary``, non-finite values as ``null``) to ``output_dir``, after the files
        queued before."""
        summary = copy.deepcopy(summary)
        self._queue.submit(lambda: self._write_summary(output_dir, summary))

    def flush(self, raise_error: bool = True) -> BaseException | None:
        """Wait until every file asked for is written; raise the first error of a write (``raise_error``), or
        return it."""
        return self._queue.flush(raise_error)

    def _write_files(
        self, output_dir: str, values: Any, summary: dict[str, Any], task: int, loggers: list, global_step: int
    ) -> None:
        os.makedirs(output_dir, exist_ok=True)
        _write_text(os.path.join(output_dir, "accuracy_matrix.csv"), accuracy_matrix_csv(values))
        self._write_summary(output_dir, summary)
        if self.log_image:
            title = heatmap_title(task, summary["final"])
            image = render_heatmap(values, title, os.path.join(output_dir, "accuracy_matrix.png"))
            for logger in loggers:
                logger.experiment.add_image(self.image_tag, image, global_step=global_step, dataformats="HWC")

    @staticmethod
    def _write_summary(output_dir: str, summary: dict[str, Any]) -> None:
        os.makedirs(output_dir, exist_ok=True)
        text = json.dumps(json_safe(summary), indent=2, allow_nan=False)
        _write_text(os.path.join(output_dir, "metrics.json"), text)
