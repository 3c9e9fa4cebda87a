"""Which epoch a trainer is at: the one place that decides which epoch counts, inside ``fit`` and outside it.

Inside ``fit`` it is ``trainer.current_epoch`` (validation runs inside the epoch it evaluates). Outside ``fit``
(``trainer.validate|test|predict``, ``cdl validate --ckpt_path``) the loops are not restored, so the epoch is the last
one trained: counted by this trainer's own fit loop, or read from the checkpoint being evaluated. The data module and
`ContinualEvaluation` both ask here and turn the epoch into a task with `TaskSchedule.task_of`; neither asks the
model. Duck-typed on the trainer (no Lightning import), so it also serves callbacks in other Lightning projects.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["checkpoint_epochs_trained", "epochs_trained", "evaluated_epoch"]

_CHECKPOINT_PROGRESS: dict[tuple[str, float], int | None] = {}


def checkpoint_epochs_trained(checkpoint: Mapping[str, Any]) -> int | None:
    """Epochs a checkpoint had finished: its fit loop's processed-epoch count, else ``epoch + 1``; else ``None``."""
    progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_progress", {}).get("current", {})
    trained = progress.get("processed")
    if trained is None and "epoch" in checkpoint:
        trained = int(checkpoint["epoch"]) + 1
    return None if trained is None else int(trained)


def _epochs_trained_in_file(path: str) -> int | None:
    file = Path(path)
    if not file.is_file():
        return None
    key = (str(file.resolve()), file.stat().st_mtime)
    if key not in _CHECKPOINT_PROGRESS:
        import torch

        checkpoint = None
        for mmap in (True, False):  # memory-mapped: only the small progress dictionary is actually read
            try:
                checkpoint = torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
                break
            except Exception as error:  # noqa: BLE001 - any unreadable checkpoint: say so, fall back below
                failure = error
        if checkpoint is None:
            warnings.warn(f"could not read the training progress of {file} ({failure}); the evaluated task falls "
                          "back to this trainer's own fit (task 0 without one)", stacklevel=2)
        _CHECKPOINT_PROGRESS[key] = None if checkpoint is None else checkpoint_epochs_trained(checkpoint)
    return _CHECKPOINT_PROGRESS[key]


def epochs_trained(trainer: Any) -> int:
    """Epochs behind the weights ``trainer`` evaluates outside ``fit``: those of the checkpoint it was given
    (``ckpt_path``), else those its own fit loop processed; 0 when neither is known."""
    ckpt_path = getattr(trainer, "ckpt_path", None)
    if ckpt_path is not None:
        trained = _epochs_trained_in_file(str(ckpt_path))
        if trained is not None:
            return trained
    fit_loop = getattr(trainer, "fit_loop", None)
    if fit_loop is None:
        return 0
    return int(fit_loop.epoch_progress.current.processed or 0)


def evaluated_epoch(trainer: Any) -> int:
    """The epoch whose task the trainer works on: ``current_epoch`` during ``fit``, else the last trained epoch."""
    if getattr(getattr(trainer, "state", None), "fn", None) == "fit":
        return int(trainer.current_epoch)
    return max(epochs_trained(trainer) - 1, 0)
