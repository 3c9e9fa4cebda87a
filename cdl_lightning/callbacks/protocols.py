"""What our callbacks expect from the LightningModule and the LightningDataModule they run with, written down once.

Nothing here is required: `ContinualEvaluation` also takes ``num_tasks`` / ``epochs_per_task`` as arguments, and reads
them from plain attributes or hyper-parameters of a foreign project (see `resolve_task_counts`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

__all__ = ["HasClassNames", "HasTaskSchedule", "TaskScheduleLike", "resolve_task_counts", "resolve_task_sizes"]


@runtime_checkable
class TaskScheduleLike(Protocol):
    """The part of a task schedule a callback reads (`cdl_lightning.tasks.TaskSchedule` is one)."""

    @property
    def num_tasks(self) -> int: ...

    @property
    def epochs_per_task(self) -> int: ...


@runtime_checkable
class HasTaskSchedule(Protocol):
    """A module or data module that states its task sequence: ``task_schedule`` (our learners and data module)."""

    @property
    def task_schedule(self) -> TaskScheduleLike: ...


@runtime_checkable
class HasClassNames(Protocol):
    """A module that names its classes in label order (read by `PredictionWriter`)."""

    @property
    def class_names(self) -> list[str]: ...


def _from(owner: Any, name: str) -> int | None:
    """``name`` from ``owner``'s task schedule, its attribute, or its hyper-parameters (in that order)."""
    if owner is None:
        return None
    if isinstance(owner, HasTaskSchedule) and isinstance(owner.task_schedule, TaskScheduleLike):
        return int(getattr(owner.task_schedule, name))
    value = getattr(owner, name, None)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    hparams = getattr(owner, "hparams", None)
    value = hparams.get(name) if isinstance(hparams, Mapping) else None
    return None if value is None else int(value)


def resolve_task_counts(given: dict[str, int | None], datamodule: Any, module: Any) -> dict[str, int]:
    """Fill ``num_tasks`` / ``epochs_per_task`` not ``given`` from the data module, else the LightningModule: a
    ``task_schedule`` (`HasTaskSchedule`), else an integer attribute of that name, else ``hparams[name]``.

    Raises:
        ValueError: a count found nowhere (the message says where it may be stated).
    """
    resolved = {}
    for name, value in given.items():
        if value is None:
            value = _from(datamodule, name)
        if value is None:
            value = _from(module, name)
        if value is None:
            raise ValueError(
                f"ContinualEvaluation needs `{name}`: pass it to the callback, or expose it as "
                f"`trainer.datamodule.{name}` (or a `task_schedule`) or in the LightningModule's hparams "
                "(`save_hyperparameters`)."
            )
        resolved[name] = int(value)
    return resolved


def resolve_task_sizes(datamodule: Any, module: Any) -> list[int] | None:
    """Classes of each task from the data module's, else the LightningModule's ``task_schedule.task_sizes``; ``None``
    when neither states them (a plain Lightning project with only ``num_tasks``)."""
    for owner in (datamodule, module):
        if isinstance(owner, HasTaskSchedule):
            sizes = getattr(owner.task_schedule, "task_sizes", None)
            if sizes is not None:
                return [int(size) for size in sizes]
    return None
