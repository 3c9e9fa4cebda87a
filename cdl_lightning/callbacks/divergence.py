"""`DivergenceCheck`: stop a run whose loss or trainable parameters stop being finite, without a per-step sync."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor
from typing_extensions import override

from cdl_lightning.callbacks.protocols import HasTaskSchedule
from cdl_lightning.tasks import task_of_epoch

__all__ = ["DivergenceCheck", "DivergenceError"]


class DivergenceError(RuntimeError):
    """Training produced a non-finite loss or non-finite trainable parameters.

    ``keeps_last_checkpoint`` tells checkpoint callbacks not to save on this exception (the last good checkpoint
    stays), ``run_status`` is what the run's ``metrics.json`` records.
    """

    keeps_last_checkpoint = True
    run_status = "diverged"


class DivergenceCheck(Callback):
    """Raise `DivergenceError` once a training loss term or a trainable parameter is NaN or infinite.

    After every training step the callback ORs ``~isfinite`` of each loss term into a flag that stays on the device
    (no host synchronisation); the flags and the trainable parameters are checked (one sync) every
    ``check_every_n_steps`` steps, before every validation and checkpoint of the fit, and at each epoch end.
    A checkpoint is never written from a diverged state: the check runs inside the checkpoint's save, before the file
    is written, so ``last.ckpt`` keeps the last good state, from which the run can be resumed (e.g. with a lower
    learning rate).

    The loss terms are read from ``pl_module.loss_terms`` (a mapping of name to tensor, set by the training step) if
    the module has it, else from the training step's returned loss.

    Args:
        check_every_n_steps: steps between two reads of the device-side flags (``0`` = only at validation,
            checkpoints and epoch ends).
    """

    def __init__(self, check_every_n_steps: int = 50) -> None:
        if check_every_n_steps < 0:
            raise ValueError(f"check_every_n_steps must be >= 0, got {check_every_n_steps}")
        self.check_every_n_steps = check_every_n_steps
        self._names: list[str] = []
        self._bad: Tensor | None = None  # per term: non-finite seen since the last read
        self._first_bad_step: Tensor | None = None  # global step of the first non-finite term since the last read
        self._step: Tensor | None = None  # device copy of the global step, advanced without a sync

    # ---------------------------------------------------------------------------------------------- accumulation
    @staticmethod
    def _terms(pl_module: pl.LightningModule, outputs: Any) -> dict[str, Tensor]:
        terms = getattr(pl_module, "loss_terms", None)
        if isinstance(terms, Mapping) and terms:
            return {name: value for name, value in terms.items() if isinstance(value, Tensor)}
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        return {"loss": loss} if isinstance(loss, Tensor) else {}

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        terms = self._terms(pl_module, outputs)
        if terms:
            values = [value.detach() for value in terms.values()]
            if all(v.dim() == 0 for v in values) and len({(v.dtype, v.device) for v in values}) == 1:
                bad = ~torch.isfinite(torch.stack(values))  # scalar terms (the usual case): three kernels
            else:
                bad = torch.stack([~torch.isfinite(v).all() for v in values])
            if self._bad is None or list(terms) != self._names or self._bad.device != bad.device:
                self._flush_names(list(terms), bad.device, trainer.global_step)
            assert self._bad is not None and self._first_bad_step is not None and self._step is not None
            # the step that produced these terms was global step - 1 (the optimizer stepped since); device-side only.
            # No term was bad since the last read exactly while _first_bad_step is still -1
            first = bad.any() & (self._first_bad_step < 0)
            self._first_bad_step = torch.where(first, self._step, self._first_bad_step)
            self._bad |= bad
            self._step += 1
        n = self.check_every_n_steps
        if n and trainer.global_step % n == 0:
            self.check(trainer, pl_module, "a periodic check")

    def _flush_names(self, names: list[str], device: torch.device, global_step: int) -> None:
        self._names = names
        self._bad = torch.zeros(len(names), dtype=torch.bool, device=device)
        self._first_bad_step = torch.full((), -1, dtype=torch.long, device=device)
        self._step = torch.full((), max(global_step - 1, 0), dtype=torch.long, device=device)

    # ---------------------------------------------------------------------------------------------------- checks
    def check(self, trainer: pl.Trainer, pl_module: pl.LightningModule, where: str, parameters: bool = True) -> None:
        """Read the flags (and, if ``parameters``, the trainable parameters); raise `DivergenceError` on any
        non-finite value, on every rank if any rank saw one."""
        bad_terms: list[str] = []
        first_step = -1
        if self._bad is not None:
            flags = self._bad.tolist()
            bad_terms = [name for name, bad in zip(self._names, flags) if bad]
            first_step = int(self._first_bad_step) if bad_terms else -1
        bad_params: list[str] = []
        if parameters:
            named = [(name, p) for name, p in pl_module.named_parameters() if p.requires_grad]
            if named:
                finite = torch.stack([torch.isfinite(p.detach()).all() for _, p in named]).tolist()
                bad_params = [name for (name, _), ok in zip(named, finite) if not ok]
        diverged = trainer.strategy.reduce_boolean_decision(bool(bad_terms or bad_params), all=False)
        if not diverged:
            return
        raise DivergenceError(self._message(trainer, pl_module, where, bad_terms, first_step, bad_params))

    @staticmethod
    def _message(
        trainer: pl.Trainer, pl_module: pl.LightningModule, where: str, terms: list[str], step: int, params: list[str]
    ) -> str:
        epoch = trainer.current_epoch
        if isinstance(pl_module, HasTaskSchedule):
            epochs_per_task = pl_module.task_schedule.epochs_per_task
            task = task_of_epoch(epoch, epochs_per_task, pl_module.task_schedule.num_tasks)
        else:  # a foreign module: what it says of itself, if anything
            epochs_per_task = getattr(pl_module, "epochs_per_task", None)
            task = getattr(pl_module, "current_task", None)
        place = f"epoch {epoch}"
        if isinstance(task, int) and epochs_per_task:
            place = f"task {task}, epoch {epoch % epochs_per_task + 1} of {epochs_per_task} (global epoch {epoch})"
        found = []
        if terms:
            found.append(f"non-finite {' and '.join(terms)} first at step {step}" if step >= 0
                         else f"non-finite {' and '.join(terms)}")
        if params:
            shown = ", ".join(params[:3]) + (f" and {len(params) - 3} more" if len(params) > 3 else "")
            found.append(f"non-finite trainable parameters ({shown})")
        last = ""
        callback = trainer.checkpoint_callback
        if callback is not None:
            last = getattr(callback, "last_model_path", "") or ""
            dirpath = getattr(callback, "dirpath", None)
            if not last and dirpath and os.path.isfile(os.path.join(dirpath, "last.ckpt")):
                last = os.path.join(dirpath, "last.ckpt")
        advice = (f"The last good checkpoint is {last}: resume with `--ckpt_path {last}`" if last
                  else "No checkpoint was written before it: start again")
        return (f"training diverged at {place}, global step {trainer.global_step} ({where}): {'; '.join(found)}. "
                f"Nothing was saved from the diverged state. {advice} with a lower learning rate "
                "(--model.init_args.lr) or another precision.")

    @staticmethod
    def _fitting(trainer: pl.Trainer) -> bool:
        return trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._fitting(trainer):
            self.check(trainer, pl_module, "before validation")

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.check(trainer, pl_module, "at the epoch end")

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self._fitting(trainer):
            self.check(trainer, pl_module, "before writing a checkpoint")
