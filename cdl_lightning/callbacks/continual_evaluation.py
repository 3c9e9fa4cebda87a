"""ContinualEvaluation: the accuracy matrix of a task sequence trained inside one ``trainer.fit``.

Works with any LightningModule whose ``validation_step`` returns the logits, the targets and the task ids of the
batch (see :class:`ContinualEvaluation`); it does not depend on the models or data of this library.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch import Tensor
from typing_extensions import override

from cdl_lightning.callbacks._accuracy_report import (
    accuracy_matrix_csv,
    json_safe,
    render_heatmap,
    summary_table,
)
from cdl_lightning.metrics import TaskAccuracy, metric_curves

__all__ = ["ContinualEvaluation", "OutputAdapter"]

OutputAdapter = Callable[[Any, Any], tuple[Tensor, Tensor, Tensor]]
"""``(validation_step outputs, batch) -> (logits or preds, targets, task_ids)``."""

_CURVE_NAMES = ("avg_acc", "forgetting", "ref_forgetting", "bwt")


class ContinualEvaluation(Callback):
    """Fill, log, save and print the accuracy matrix ``R[t, j]`` of a class-/task-incremental run.

    The whole task sequence runs in one ``trainer.fit`` with ``epochs_per_task`` epochs per task; the task being
    trained at epoch ``e`` is ``t = min(e // epochs_per_task, num_tasks - 1)``. Every validation epoch (except the
    sanity check) accumulates a :class:`~cdl_lightning.metrics.TaskAccuracy` over the validation loader, which should
    hold the test data of the tasks seen so far with each sample's task id, and then writes the per-task accuracies
    into row ``t`` of the matrix (``R[t, j]`` for ``j <= t``; ``NaN`` above the diagonal). Validate once per task
    (``Trainer(check_val_every_n_epoch=epochs_per_task)``); if validation runs more often, the last validation of a
    task wins. Under ``trainer.validate`` the row is the task of the last trained epoch (of this trainer, or of the
    checkpoint passed as ``ckpt_path``).

    Counts are summed across processes, so under DDP the matrix is exact when the validation loader uses
    ``lightning.pytorch.overrides.distributed.UnrepeatedDistributedSampler`` (Lightning's default sampler pads).

    After each evaluation it

    - logs ``cl/avg_acc``, ``cl/forgetting``, ``cl/ref_forgetting``, ``cl/bwt`` and ``cl/task_{j}_acc`` (``j <= t``)
      through ``pl_module.log`` (identical on every rank; see :mod:`cdl_lightning.metrics.functional` for formulas);
    - on global rank zero writes ``accuracy_matrix.csv``, ``metrics.json`` and ``accuracy_matrix.png`` to
      ``output_dir``, adds the heatmap to every attached TensorBoard logger and prints a rich table.

    The matrix is part of the checkpoint (``state_dict``), so a resumed run keeps the rows already filled.

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
        num_tasks: number of tasks ``T``. Default: ``trainer.datamodule.num_tasks``, else ``pl_module.hparams``.
        epochs_per_task: epochs trained per task. Default: ``trainer.datamodule.epochs_per_task``, else
            ``pl_module.hparams``.
        output_dir: where rank zero writes its files. Default: ``trainer.log_dir`` (the logger's version directory,
            or ``default_root_dir`` without logger).
        print_table: print a rich table of the matrix after each evaluation (rank zero).
        log_image: save ``accuracy_matrix.png`` and add the heatmap to attached TensorBoard loggers (rank zero).
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
    ) -> None:
        for name, value in (("num_tasks", num_tasks), ("epochs_per_task", epochs_per_task)):
            if value is not None and value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value}.")
        self._num_tasks_arg = num_tasks
        self._epochs_per_task_arg = epochs_per_task
        self._num_tasks = num_tasks
        self._epochs_per_task = epochs_per_task
        self.output_dir = output_dir
        self.print_table = print_table
        self.log_image = log_image
        self.output_adapter = output_adapter
        self.logits_key = logits_key
        self.targets_key = targets_key
        self.task_ids_key = task_ids_key
        self.log_prefix = log_prefix
        self._matrix: Tensor | None = None
        self._filled: list[bool] = []
        self._metric: TaskAccuracy | None = None
        self._resolved_output_dir: str | None = None
        self._checkpoint_epochs_trained: int | None = None
        self.last_counts: dict[str, Any] | None = None
        """``{"task": t, "correct": [...], "total": [...]}``: global per-task counts of the last evaluation."""
        self.run_status: str | None = None
        """Set when the fit stops on an exception: the exception's ``run_status`` (e.g. ``"diverged"``) or
        ``"failed"``; written to ``metrics.json`` as ``status`` (otherwise ``"complete"`` or ``"partial"``)."""
        if num_tasks is not None:
            self._allocate(num_tasks)

    @property
    @override
    def state_key(self) -> str:
        # Several instances (e.g. one per evaluated head) may coexist when their `log_prefix` differs.
        return self._generate_state_key(log_prefix=self.log_prefix)

    # ------------------------------------------------------------------ public, programmatic access
    @property
    def num_tasks(self) -> int | None:
        """Number of tasks (resolved at ``setup`` when not given)."""
        return self._num_tasks

    @property
    def epochs_per_task(self) -> int | None:
        """Epochs per task (resolved at ``setup`` when not given)."""
        return self._epochs_per_task

    @property
    def matrix(self) -> Tensor:
        """Copy of the ``T x T`` float64 accuracy matrix in %: ``R[t, j]``, ``NaN`` above the diagonal or unfilled."""
        if self._matrix is None:
            raise RuntimeError("The accuracy matrix does not exist yet: pass `num_tasks` or attach to a trainer.")
        return self._matrix.clone()

    @property
    def filled_rows(self) -> list[int]:
        """Indices ``t`` of the rows that were evaluated."""
        return [t for t, filled in enumerate(self._filled) if filled]

    @property
    def results(self) -> list[float]:
        """Average accuracy ``A_t`` of every row ``t = 0..T-1`` (``NaN`` for rows not evaluated yet)."""
        return metric_curves(self.matrix)["avg_acc"]

    def summary(self) -> dict[str, Any]:
        """Everything written to ``metrics.json``, with ``NaN`` (not ``None``) for missing values.

        Returns:
            ``num_tasks``, ``epochs_per_task``, ``filled_rows``, ``accuracy_matrix`` (nested lists), ``curves``
            (``avg_acc`` / ``forgetting`` / ``ref_forgetting`` / ``bwt``: one value per row) and ``final``
            (``task``: last filled row, or ``None``, and the four metrics of that row), ``last_evaluation``
            (:attr:`last_counts`: per-task sample counts of the last evaluation, to audit exactness), ``status``
            (``"complete"`` when every row is filled, ``"partial"`` before, or why the fit stopped: ``"diverged"``,
            ``"failed"``).
        """
        matrix = self.matrix
        curves = metric_curves(matrix)
        rows = self.filled_rows
        last = rows[-1] if rows else None
        final: dict[str, Any] = {"task": last}
        final.update({name: curves[name][last] if last is not None else math.nan for name in _CURVE_NAMES})
        return {
            "num_tasks": self._num_tasks,
            "epochs_per_task": self._epochs_per_task,
            "filled_rows": rows,
            "accuracy_matrix": matrix.tolist(),
            "curves": curves,
            "final": final,
            "last_evaluation": self.last_counts,
            "status": self.run_status or ("complete" if rows and len(rows) == self._num_tasks else "partial"),
        }

    def current_task(self, trainer: Trainer) -> int:
        """Task index of the current evaluation: ``min(epoch // epochs_per_task, num_tasks - 1)``.

        During ``fit`` the epoch is ``trainer.current_epoch`` (validation runs inside the epoch it evaluates).
        Outside ``fit`` it is the last trained epoch: ``epochs trained - 1``, counted by this trainer's fit loop,
        or read from the checkpoint restored by ``trainer.validate(ckpt_path=...)``.
        """
        if self._num_tasks is None or self._epochs_per_task is None:
            raise RuntimeError("`num_tasks` and `epochs_per_task` are not resolved yet (call after `setup`).")
        if trainer.state.fn == TrainerFn.FITTING:
            epoch = trainer.current_epoch
        else:
            trained = trainer.fit_loop.epoch_progress.current.processed or self._checkpoint_epochs_trained or 0
            epoch = max(trained - 1, 0)
        return min(epoch // self._epochs_per_task, self._num_tasks - 1)

    # ------------------------------------------------------------------ Lightning hooks
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._resolved_output_dir = None  # a new run may have a new log directory
        self._checkpoint_epochs_trained = None  # set again by `on_load_checkpoint` (which runs after `setup`)
        num_tasks = self._resolve("num_tasks", self._num_tasks_arg, trainer, pl_module)
        self._epochs_per_task = self._resolve("epochs_per_task", self._epochs_per_task_arg, trainer, pl_module)
        if self._matrix is not None and self._matrix.shape[0] != num_tasks:
            if any(self._filled):
                raise ValueError(
                    f"ContinualEvaluation holds a matrix over {self._matrix.shape[0]} tasks but this run has "
                    f"{num_tasks} tasks."
                )
            self._matrix = None
        self._num_tasks = num_tasks
        if self._matrix is None:
            self._allocate(num_tasks)
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
        logits, targets, task_ids = self._extract(outputs, batch)
        self._require_metric().update(logits.detach(), targets, task_ids)

    @override
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metric = self._require_metric()
        correct, total = metric.counts()  # collective under DDP: every rank gets the global counts
        metric.reset()
        correct, total = correct.cpu().double(), total.cpu().double()
        t = self.current_task(trainer)
        accuracy = torch.where(total > 0, 100.0 * correct / total.clamp_min(1), torch.nan)
        self._check_coverage(total, t)
        row = torch.full((self._num_tasks,), math.nan, dtype=torch.float64)
        row[: t + 1] = accuracy[: t + 1]
        assert self._matrix is not None
        self._matrix[t] = row
        self._filled[t] = True
        self.last_counts = {"task": t, "correct": correct.long().tolist(), "total": total.long().tolist()}

        curves = metric_curves(self._matrix)
        values = {name: curves[name][t] for name in _CURVE_NAMES}
        for name, value in values.items():
            pl_module.log(f"{self.log_prefix}{name}", value, sync_dist=False, rank_zero_only=False)
        for j in range(t + 1):
            pl_module.log(f"{self.log_prefix}task_{j}_acc", float(row[j]), sync_dist=False, rank_zero_only=False)

        output_dir = self._output_dir(trainer)  # collective (broadcast): resolve on every rank
        if trainer.is_global_zero:
            self._write_outputs(trainer, output_dir, t)

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        # a run that stopped must not look finished: rewrite metrics.json with the reason
        stopped = "interrupted" if isinstance(exception, KeyboardInterrupt) else "failed"
        self.run_status = getattr(exception, "run_status", stopped)
        if self._resolved_output_dir is not None and trainer.is_global_zero and self._matrix is not None:
            path = os.path.join(self._resolved_output_dir, "metrics.json")
            if os.path.isfile(path):
                with open(path, "w") as file:
                    json.dump(json_safe(self.summary()), file, indent=2, allow_nan=False)

    @override
    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        # Remember how many epochs the checkpoint had trained: `trainer.validate(ckpt_path=...)` does not restore
        # the fit loop, and `current_task` needs it outside `fit`.
        progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_progress", {}).get("current", {})
        trained = progress.get("processed")
        if trained is None and "epoch" in checkpoint:
            trained = int(checkpoint["epoch"]) + 1
        self._checkpoint_epochs_trained = trained

    @override
    def state_dict(self) -> dict[str, Any]:
        if self._matrix is None:
            return {}
        # Plain Python lists, floats (NaN allowed) and bools: loadable with `torch.load(weights_only=True)`.
        return {"num_tasks": self._num_tasks, "matrix": self._matrix.tolist(), "filled": list(self._filled)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        num_tasks = int(state_dict["num_tasks"])
        if self._num_tasks is not None and num_tasks != self._num_tasks:
            raise ValueError(
                f"Checkpoint holds an accuracy matrix over {num_tasks} tasks, this callback has {self._num_tasks}."
            )
        matrix = torch.tensor(state_dict["matrix"], dtype=torch.float64)
        if matrix.shape != (num_tasks, num_tasks) or len(state_dict["filled"]) != num_tasks:
            raise ValueError(f"Malformed ContinualEvaluation state: matrix of shape {tuple(matrix.shape)}.")
        self._num_tasks = num_tasks
        self._matrix = matrix
        self._filled = [bool(f) for f in state_dict["filled"]]

    # ------------------------------------------------------------------ internals
    def _allocate(self, num_tasks: int) -> None:
        self._matrix = torch.full((num_tasks, num_tasks), math.nan, dtype=torch.float64)
        self._filled = [False] * num_tasks

    def _require_metric(self) -> TaskAccuracy:
        if self._metric is None:
            raise RuntimeError("ContinualEvaluation was not set up: attach it to a Trainer through `callbacks=`.")
        return self._metric

    @staticmethod
    def _resolve(name: str, given: int | None, trainer: Trainer, pl_module: LightningModule) -> int:
        if given is not None:
            return int(given)
        datamodule = getattr(trainer, "datamodule", None)
        value = getattr(datamodule, name, None) if datamodule is not None else None
        if value is None:
            hparams = getattr(pl_module, "hparams", None)
            value = hparams.get(name) if isinstance(hparams, Mapping) else None
        if value is None:
            raise ValueError(
                f"ContinualEvaluation needs `{name}`: pass it to the callback, or expose it as "
                f"`trainer.datamodule.{name}` or in the LightningModule's hparams (`save_hyperparameters`)."
            )
        return int(value)

    def _extract(self, outputs: Any, batch: Any) -> tuple[Tensor, Tensor, Tensor]:
        if self.output_adapter is not None:
            return self.output_adapter(outputs, batch)
        from_batch = isinstance(batch, Sequence) and len(batch) == 3
        if isinstance(outputs, Tensor) and from_batch:
            return outputs, batch[1], batch[2]
        if isinstance(outputs, Mapping):
            logits = outputs.get(self.logits_key, outputs.get("preds"))
            targets = outputs.get(self.targets_key, batch[1] if from_batch else None)
            task_ids = outputs.get(self.task_ids_key, batch[2] if from_batch else None)
            if logits is not None and targets is not None and task_ids is not None:
                return logits, targets, task_ids
        if isinstance(outputs, Sequence) and len(outputs) == 3 and all(isinstance(o, Tensor) for o in outputs):
            return outputs[0], outputs[1], outputs[2]
        raise TypeError(
            "ContinualEvaluation could not read the output of `validation_step`. Return `(logits, targets, "
            f"task_ids)`, or a dict with keys '{self.logits_key}' (or 'preds'), '{self.targets_key}', "
            f"'{self.task_ids_key}', or pass `output_adapter=`. Got {type(outputs).__name__}."
        )

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

    def _write_outputs(self, trainer: Trainer, output_dir: str, t: int) -> None:
        os.makedirs(output_dir, exist_ok=True)
        summary = self.summary()
        matrix = self._matrix.numpy()  # type: ignore[union-attr]
        with open(os.path.join(output_dir, "accuracy_matrix.csv"), "w") as file:
            file.write(accuracy_matrix_csv(matrix))
        with open(os.path.join(output_dir, "metrics.json"), "w") as file:
            json.dump(json_safe(summary), file, indent=2, allow_nan=False)
        final = summary["final"]
        if self.log_image:
            title = (
                f"after task {t}: avg acc {final['avg_acc']:.2f}, forgetting {final['forgetting']:.2f}, "
                f"ref. forgetting {final['ref_forgetting']:.2f}"
            )
            image = render_heatmap(matrix, title, os.path.join(output_dir, "accuracy_matrix.png"))
            for logger in trainer.loggers:
                if isinstance(logger, TensorBoardLogger):
                    logger.experiment.add_image(
                        f"{self.log_prefix}accuracy_matrix", image, global_step=trainer.global_step, dataformats="HWC"
                    )
        if self.print_table:
            from rich import get_console

            get_console().print(summary_table(matrix, summary["curves"]))
