"""ContinualEvaluation: the accuracy matrix of a task sequence trained inside one ``trainer.fit``.

Works with any LightningModule whose ``validation_step`` returns the logits, the targets and the task ids of the
batch (see :class:`ContinualEvaluation`); it does not depend on the models or data of this library (what it reads
from them, when present, is written down in `cdl_lightning.callbacks.protocols`).
"""

from __future__ import annotations

import re
import warnings
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch import Tensor
from typing_extensions import override

from cdl_lightning.callbacks._accuracy_matrix import AccuracyMatrix
from cdl_lightning.callbacks._accuracy_writer import AccuracyReportWriter
from cdl_lightning.callbacks._step_outputs import OutputAdapter, StepOutputParser
from cdl_lightning.callbacks.protocols import resolve_task_counts, resolve_task_sizes
from cdl_lightning.metrics import MATRIX_METRICS, TaskAccuracy
from cdl_lightning.progress import evaluated_epoch
from cdl_lightning.tasks import task_of_epoch

__all__ = ["ContinualEvaluation", "OutputAdapter"]


class ContinualEvaluation(Callback):
    """Fill, log, save and print the accuracy matrix ``R[t, j]`` of a class-/task-incremental run.

    The whole task sequence runs in one ``trainer.fit`` with ``epochs_per_task`` epochs per task; the task being
    trained at epoch ``e`` is ``t = min(e // epochs_per_task, num_tasks - 1)`` (`cdl_lightning.tasks.task_of_epoch`).
    Every validation epoch (except the sanity check) accumulates a :class:`~cdl_lightning.metrics.TaskAccuracy` over
    the validation loader, which should hold the test data of the tasks seen so far with each sample's task id, and
    then writes the per-task accuracies into row ``t`` of the matrix (``R[t, j]`` for ``j <= t``; ``NaN`` above the
    diagonal). Validate once per task (``Trainer(check_val_every_n_epoch=epochs_per_task)``); if validation runs more
    often, the last validation of a task wins. Under ``trainer.validate`` the row is the task of the last trained
    epoch (of the checkpoint passed as ``ckpt_path``, or of this trainer's fit: `cdl_lightning.progress`).

    Counts are summed across processes, so under DDP the matrix is exact when the validation loader uses
    ``lightning.pytorch.overrides.distributed.UnrepeatedDistributedSampler`` (Lightning's default sampler pads).

    After each evaluation it

    - logs ``cl/{key}`` for every metric of `cdl_lightning.metrics.MATRIX_METRICS` (``avg_acc``, ``forgetting``,
      ``ref_forgetting``, ``bwt``) and ``cl/task_{j}_acc`` (``j <= t``) through ``pl_module.log`` (identical on every
      rank; see :mod:`cdl_lightning.metrics.functional` for formulas);
    - on global rank zero writes ``accuracy_matrix.csv``, ``metrics.json`` and ``accuracy_matrix.png`` to
      ``output_dir``, adds the heatmap to every attached TensorBoard logger and prints a rich table. The files and
      the image are written by a background thread (``background_writes``), so that rank zero trains on (and the other
      ranks do not wait for it) while matplotlib draws; the thread is flushed when the fit/validate/test ends (the
      files are complete when ``trainer.fit`` returns) or stops on an exception, and an error it met is raised then
      (or at the next evaluation). The table is printed at once, in order with the other console output.

    The matrix is part of the checkpoint (``state_dict``), so a resumed run keeps the rows already filled.

    The pieces, each in its own file: `StepOutputParser` reads the step outputs, `AccuracyMatrix` keeps the matrix
    (pure, checkpointable), `AccuracyReportWriter` writes files, TensorBoard image and table; this class only decides
    when and which row to fill.

    What ``validation_step`` must return (unless ``output_adapter`` is given), with logits ``(B, C)`` or
    predictions ``(B,)``, integer targets ``(B,)`` and integer task ids ``(B,)``:

    - a tuple/list ``(logits, targets, task_ids)``;
    - a dict with keys ``logits`` (or ``preds``), ``targets`` and ``task_ids`` (names configurable); missing
      ``targets`` / ``task_ids`` are read from the batch if it is a ``(inputs, targets, task_ids)`` sequence;
    - the logits tensor alone, if the batch is a ``(inputs, targets, task_ids)`` sequence.

    Example:
        >>> trainer = Trainer(max_epochs=3 * 2, check_val_every_n_epoch=2, reload_dataloaders_every_n_epochs=1,
        ...                   callbacks=[ContinualEvaluation(num_tasks=3, epochs_per_task=2)])  # doctest: +SKIP

    Args:
        num_tasks: number of tasks ``T``. Default: from the data module, else the LightningModule: its
            ``task_schedule`` (`~cdl_lightning.callbacks.protocols.HasTaskSchedule`), a ``num_tasks`` attribute, or
            ``hparams["num_tasks"]`` (`~cdl_lightning.callbacks.protocols.resolve_task_counts`).
        epochs_per_task: epochs trained per task. Default: found as ``num_tasks`` is.
        output_dir: where rank zero writes its files. Default: ``trainer.log_dir`` (the logger's version directory,
            or ``default_root_dir`` without logger).
        print_table: print a rich table of the matrix after each evaluation (rank zero).
        log_image: save ``accuracy_matrix.png`` and add the heatmap to attached TensorBoard loggers (rank zero).
        background_writes: write the files, the PNG and the TensorBoard image in a background thread of rank zero
            (one ordered queue, fed with copies of the matrix and summary). ``False`` writes them before training
            goes on (about 0.5 s per evaluation with ``log_image``); the files written are the same.
        output_adapter: function ``(outputs, batch) -> (logits or preds, targets, task_ids)`` for modules whose
            ``validation_step`` returns something else; replaces the default parsing described above.
        logits_key: dict key of the logits (``"preds"`` is tried too).
        targets_key: dict key of the targets.
        task_ids_key: dict key of the task ids.
        log_prefix: prefix of the logged scalar names; also the identity of the callback's state in checkpoints, so
            several instances can be used together with different prefixes.
    """

    def __init__(
        self,
        num_tasks: int | None = None,
        epochs_per_task: int | None = None,
        output_dir: str | None = None,
        print_table: bool = True,
        log_image: bool = True,
        output_adapter: OutputAdapter | None = None,
        logits_key: str = "logits",
        targets_key: str = "targets",
        task_ids_key: str = "task_ids",
        log_prefix: str = "cl/",
        background_writes: bool = True,
    ) -> None:
        for name, value in (("num_tasks", num_tasks), ("epochs_per_task", epochs_per_task)):
            if value is not None and value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value}.")
        self._num_tasks_arg = num_tasks
        self._epochs_per_task_arg = epochs_per_task
        self._epochs_per_task = epochs_per_task
        self.output_dir = output_dir
        self.print_table = print_table
        self.log_image = log_image
        self.output_adapter = output_adapter
        self.logits_key = logits_key
        self.targets_key = targets_key
        self.task_ids_key = task_ids_key
        self.log_prefix = log_prefix
        self.background_writes = background_writes
        self._parse = StepOutputParser(output_adapter, logits_key, targets_key, task_ids_key)
        self._writer = AccuracyReportWriter(print_table, log_image, image_tag=f"{log_prefix}accuracy_matrix",
                                            background=background_writes)
        self._matrix: AccuracyMatrix | None = AccuracyMatrix(num_tasks) if num_tasks is not None else None
        self._metric: TaskAccuracy | None = None
        self._resolved_output_dir: str | None = None
        self._task_sizes: list[int] | None = None
        self.run_status: str | None = None
        """Set when the fit stops on an exception: the exception's ``run_status`` (e.g. ``"diverged"``) or
        ``"failed"``; written to ``metrics.json`` as ``status`` (otherwise ``"complete"`` or ``"partial"``)."""

    @property
    @override
    def state_key(self) -> str:
        # Several instances (e.g. one per evaluated head) may coexist when their `log_prefix` differs.
        return self._generate_state_key(log_prefix=self.log_prefix)

    # ------------------------------------------------------------------ public, programmatic access
    @property
    def num_tasks(self) -> int | None:
        """Number of tasks (resolved at ``setup`` when not given)."""
        return self._matrix.num_tasks if self._matrix is not None else None

    @property
    def epochs_per_task(self) -> int | None:
        """Epochs per task (resolved at ``setup`` when not given)."""
        return self._epochs_per_task

    @property
    def matrix(self) -> Tensor:
        """Copy of the ``T x T`` float64 accuracy matrix in %: ``R[t, j]``, ``NaN`` above the diagonal or unfilled."""
        return self._require_matrix().values.clone()

    @property
    def filled_rows(self) -> list[int]:
        """Indices ``t`` of the rows that were evaluated."""
        return self._matrix.filled_rows if self._matrix is not None else []

    @property
    def last_counts(self) -> dict[str, Any] | None:
        """``{"task": t, "correct": [...], "total": [...]}``: global per-task counts of the last evaluation."""
        return self._matrix.last_counts if self._matrix is not None else None

    @property
    def results(self) -> list[float]:
        """Average accuracy ``A_t`` of every row ``t = 0..T-1`` (``NaN`` for rows not evaluated yet)."""
        return self._require_matrix().curves()["avg_acc"]

    def summary(self) -> dict[str, Any]:
        """Everything written to ``metrics.json``, with ``NaN`` (not ``None``) for missing values.

        Returns:
            ``num_tasks``, ``epochs_per_task``, ``filled_rows``, ``accuracy_matrix`` (nested lists), ``curves`` (one
            value per row for each `MATRIX_METRICS` key: ``avg_acc`` / ``forgetting`` / ``ref_forgetting`` /
            ``bwt``), ``task_sizes`` (classes of each task when the data module or model has a task schedule, else
            ``None``: with them a reader can put an entry next to chance) and ``final`` (``task``: last filled row,
            or ``None``, and each metric of that row),
            ``last_evaluation`` (:attr:`last_counts`: per-task sample counts of the last evaluation, to audit
            exactness), ``status`` (``"complete"`` when every row is filled, ``"partial"`` before, or why the fit
            stopped: ``"diverged"``, ``"failed"``, ``"interrupted"``).
        """
        summary = self._require_matrix().summary(self._epochs_per_task)
        summary["task_sizes"] = self._task_sizes
        complete = len(summary["filled_rows"]) == summary["num_tasks"]
        summary["status"] = self.run_status or ("complete" if complete else "partial")
        return summary

    def current_task(self, trainer: Trainer) -> int:
        """Task index of the current evaluation: ``task_of_epoch(evaluated_epoch(trainer), epochs_per_task,
        num_tasks)``: during ``fit`` the epoch is ``trainer.current_epoch`` (validation runs inside the epoch it
        evaluates); outside ``fit`` the last trained epoch, read from the checkpoint given as ``ckpt_path`` or counted
        by this trainer's fit loop."""
        if self._matrix is None or self._epochs_per_task is None:
            raise RuntimeError("`num_tasks` and `epochs_per_task` are not resolved yet (call after `setup`).")
        return task_of_epoch(evaluated_epoch(trainer), self._epochs_per_task, self._matrix.num_tasks)

    # ------------------------------------------------------------------ Lightning hooks
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._resolved_output_dir = None  # a new run may have a new log directory
        given = {"num_tasks": self._num_tasks_arg, "epochs_per_task": self._epochs_per_task_arg}
        counts = resolve_task_counts(given, getattr(trainer, "datamodule", None), pl_module)
        num_tasks, self._epochs_per_task = counts["num_tasks"], counts["epochs_per_task"]
        sizes = resolve_task_sizes(getattr(trainer, "datamodule", None), pl_module)
        self._task_sizes = sizes if sizes is not None and len(sizes) == num_tasks else None
        if self._matrix is not None and self._matrix.num_tasks != num_tasks:
            if any(self._matrix.filled):
                raise ValueError(
                    f"ContinualEvaluation holds a matrix over {self._matrix.num_tasks} tasks but this run has "
                    f"{num_tasks} tasks."
                )
            self._matrix = None
        if self._matrix is None:
            self._matrix = AccuracyMatrix(num_tasks)
        if self._metric is None or self._metric.num_tasks != num_tasks:
            self._metric = TaskAccuracy(num_tasks)
        if trainer.world_size > 1:
            # Our scalars are computed from globally synced counts, identical on every rank: `sync_dist` is not needed
            # and Lightning's advice to use it is noise. Silence it for our own keys only.
            warnings.filterwarnings(
                "ignore",
                message=re.escape(f"It is recommended to use `self.log('{self.log_prefix}"),
                category=PossibleUserWarning,
            )

    @override
    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metric = self._require_metric()
        metric.to(pl_module.device)
        metric.reset()

    @override
    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if trainer.sanity_checking:
            return
        logits, targets, task_ids = self._parse(outputs, batch)
        self._require_metric().update(logits.detach(), targets, task_ids)

    @override
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metric = self._require_metric()
        correct, total = metric.counts()  # collective under DDP: every rank gets the global counts
        metric.reset()
        t = self.current_task(trainer)
        self._check_coverage(total.cpu(), t)
        matrix = self._require_matrix()
        row = matrix.fill_row(t, correct, total)

        curves = matrix.curves()
        for metric_info in MATRIX_METRICS:
            value = curves[metric_info.key][t]
            pl_module.log(f"{self.log_prefix}{metric_info.key}", value, sync_dist=False, rank_zero_only=False)
        for j in range(t + 1):
            pl_module.log(f"{self.log_prefix}task_{j}_acc", float(row[j]), sync_dist=False, rank_zero_only=False)

        output_dir = self._output_dir(trainer)  # collective (broadcast): resolve on every rank
        if trainer.is_global_zero:
            self._writer.write(output_dir, matrix, self.summary(), t, trainer.loggers, trainer.global_step)

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        # a run that stopped must not look finished: rewrite metrics.json with the reason
        stopped = "interrupted" if isinstance(exception, (KeyboardInterrupt, SIGTERMException)) else "failed"
        self.run_status = getattr(exception, "run_status", stopped)
        # the original exception goes on; an error of the writing thread is reported with it
        error = self._writer.flush(raise_error=False)
        if self._resolved_output_dir is not None and trainer.is_global_zero and self._matrix is not None:
            self._writer.write_summary(self._resolved_output_dir, self.summary())
        error = self._writer.flush(raise_error=False) or error
        if error is not None:
            rank_zero_warn(f"ContinualEvaluation: writing the evaluation's files failed too: {error!r}")

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.flush()

    def flush(self) -> None:
        """Wait until the files of every evaluation so far are written (rank zero); raise the error a write met."""
        self._writer.flush()

    @override
    def state_dict(self) -> dict[str, Any]:
        return self._matrix.state_dict() if self._matrix is not None else {}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        num_tasks = int(state_dict["num_tasks"])
        if self._matrix is not None and num_tasks != self._matrix.num_tasks:
            raise ValueError(
                f"Checkpoint holds an accuracy matrix over {num_tasks} tasks, this callback has "
                f"{self._matrix.num_tasks}."
            )
        self._matrix = AccuracyMatrix.from_state_dict(state_dict)

    # ------------------------------------------------------------------ internals
    def _require_matrix(self) -> AccuracyMatrix:
        if self._matrix is None:
            raise RuntimeError("The accuracy matrix does not exist yet: pass `num_tasks` or attach to a trainer.")
        return self._matrix

    def _require_metric(self) -> TaskAccuracy:
        if self._metric is None:
            raise RuntimeError("ContinualEvaluation was not set up: attach it to a Trainer through `callbacks=`.")
        return self._metric

    def _check_coverage(self, total: Tensor, t: int) -> None:
        missing = [j for j in range(t + 1) if total[j] == 0]
        if missing:
            rank_zero_warn(f"ContinualEvaluation: no validation sample of seen task(s) {missing}; R[{t}, j] is NaN.")
        if bool((total[t + 1 :] > 0).any()):
            rank_zero_warn(
                f"ContinualEvaluation: samples of tasks after the current task {t} were evaluated; they are ignored."
            )

    def _output_dir(self, trainer: Trainer) -> str:
        if self._resolved_output_dir is None:
            # `trainer.log_dir` broadcasts from rank zero, so every rank must take this branch together.
            self._resolved_output_dir = self.output_dir or trainer.log_dir or trainer.default_root_dir
        return self._resolved_output_dir
