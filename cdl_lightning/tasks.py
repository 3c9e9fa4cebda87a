"""`TaskSchedule`: the one owner of "which task is it, and what are its classes" for a class-incremental run.

Pure Python (no torch, no Lightning): the data module builds the schedule from its source and split settings, the CLI
links it once into the model, the model and the callbacks read every task fact from it. Task ``t`` owns the
contiguous remapped labels ``[offsets[t], offsets[t] + task_sizes[t])`` with ``offsets[t] = sum(task_sizes[:t])``;
one ``trainer.fit`` trains every task, ``epochs_per_task`` epochs each, so epoch ``e`` trains task
``min(e // epochs_per_task, num_tasks - 1)``.

A schedule travels in checkpoints as plain values (`TaskSchedule.to_dict`), so ``torch.load(weights_only=True)``
reads it back without unpickling any class.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

__all__ = ["TaskSchedule", "task_of_epoch", "task_offsets", "task_ranges"]


def task_of_epoch(epoch: int, epochs_per_task: int, num_tasks: int) -> int:
    """Task trained at (0-based) ``epoch``: ``min(epoch // epochs_per_task, num_tasks - 1)`` (the one place this is
    computed; `TaskSchedule.task_of` and `ContinualEvaluation` call it)."""
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    return min(epoch // epochs_per_task, num_tasks - 1)


def task_offsets(sizes: Sequence[int]) -> list[int]:
    """First remapped label of each task: ``[0, s0, s0 + s1, ...]`` (length ``len(sizes)``)."""
    offsets, start = [], 0
    for size in sizes:
        offsets.append(start)
        start += int(size)
    return offsets


def task_ranges(sizes: Sequence[int]) -> list[tuple[int, int]]:
    """Half-open remapped label range ``(start, stop)`` of each task."""
    return [(offset, offset + int(size)) for offset, size in zip(task_offsets(sizes), sizes, strict=True)]


@dataclass(frozen=True)
class TaskSchedule:
    """The task sequence of one run: the classes of every task and the epochs spent on each.

    Example:
        >>> schedule = TaskSchedule(task_sizes=(4, 2, 2), epochs_per_task=3)
        >>> schedule.num_classes, schedule.offsets, schedule.task_range(1)
        (8, (0, 4, 6), (4, 6))
        >>> schedule.task_of(7), schedule.task_of(100), schedule.is_last_epoch_of_task(5)
        (2, 2, True)

    Args:
        task_sizes: classes of each task (every entry >= 1).
        epochs_per_task: training epochs of each task (>= 1).
        class_order: original label of each remapped class (``class_order[i]`` became label ``i``); ``None`` when
            not known (a schedule built by hand).
        class_names: name of each remapped class; ``None`` names them ``"0"``, ``"1"``, ...

    Raises:
        ValueError: empty or non-positive task sizes, ``epochs_per_task < 1``, a class order that is not a
            permutation of ``range(num_classes)``, or class names of the wrong length.
    """

    task_sizes: tuple[int, ...]
    epochs_per_task: int = 1
    class_order: tuple[int, ...] | None = None
    class_names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        sizes = _int_tuple(self.task_sizes, "task_sizes")
        if not sizes or any(size < 1 for size in sizes):
            raise ValueError(f"task_sizes must be a non-empty list of positive class counts, got {list(sizes)}")
        if isinstance(self.epochs_per_task, bool) or int(self.epochs_per_task) != self.epochs_per_task:
            raise ValueError(f"epochs_per_task must be an integer, got {self.epochs_per_task!r}")
        if self.epochs_per_task < 1:
            raise ValueError(f"epochs_per_task must be >= 1, got {self.epochs_per_task}")
        num_classes = sum(sizes)
        order = None
        if self.class_order is not None:
            order = _int_tuple(self.class_order, "class_order")
            if sorted(order) != list(range(num_classes)):
                raise ValueError(f"class_order must be a permutation of range({num_classes}) (the sum of task_sizes "
                                 f"{list(sizes)}), got {len(order)} entries starting {list(order[:8])}")
        names = None
        if self.class_names is not None:
            if isinstance(self.class_names, str):
                raise ValueError("class_names must be a list of names, got one string")
            names = tuple(str(name) for name in self.class_names)
            if len(names) != num_classes:
                raise ValueError(f"class_names has {len(names)} entries but the tasks hold {num_classes} classes")
        object.__setattr__(self, "task_sizes", sizes)
        object.__setattr__(self, "epochs_per_task", int(self.epochs_per_task))
        object.__setattr__(self, "class_order", order)
        object.__setattr__(self, "class_names", names)

    # ------------------------------------------------------------------------------------------------------ classes
    @property
    def num_tasks(self) -> int:
        return len(self.task_sizes)

    @property
    def num_classes(self) -> int:
        return sum(self.task_sizes)

    @property
    def offsets(self) -> tuple[int, ...]:
        """First label of every task, then the class count: ``(0, s0, s0 + s1, ..., num_classes)``."""
        return (*task_offsets(self.task_sizes), self.num_classes)

    @property
    def names(self) -> tuple[str, ...]:
        """Class names in label order (``class_names``, or ``"0"``, ``"1"``, ... when not given)."""
        return self.class_names if self.class_names is not None else tuple(str(i) for i in range(self.num_classes))

    def task_range(self, task: int) -> tuple[int, int]:
        """Half-open label range ``(start, stop)`` of ``task``."""
        self._check_task(task)
        offsets = self.offsets
        return offsets[task], offsets[task + 1]

    def classes(self, task: int) -> range:
        """Labels of ``task``."""
        return range(*self.task_range(task))

    def seen_classes(self, task: int) -> range:
        """Labels of tasks ``0..task``: what a learner that finished ``task`` can predict."""
        return range(0, self.task_range(task)[1])

    # --------------------------------------------------------------------------------------------------------- time
    @property
    def max_epochs(self) -> int:
        """Epochs of the whole sequence: ``num_tasks * epochs_per_task``."""
        return self.num_tasks * self.epochs_per_task

    def task_of(self, epoch: int) -> int:
        """Task trained at (0-based) ``epoch``: ``min(epoch // epochs_per_task, num_tasks - 1)``."""
        return task_of_epoch(epoch, self.epochs_per_task, self.num_tasks)

    def task_after(self, epochs_trained: int) -> int:
        """Last task trained once ``epochs_trained`` epochs are done (task 0 before any epoch)."""
        return self.task_of(max(epochs_trained - 1, 0))

    def epoch_in_task(self, epoch: int) -> int:
        """Position of ``epoch`` within its task, ``0..epochs_per_task - 1``."""
        return epoch % self.epochs_per_task

    def is_last_epoch_of_task(self, epoch: int) -> bool:
        """Whether ``epoch`` ends its task (the epoch after which the task is evaluated and snapshotted)."""
        return (epoch + 1) % self.epochs_per_task == 0

    # ------------------------------------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """Plain values (lists, ints, strings, ``None``): safe in checkpoints, YAML and ``hparams``."""
        return {
            "task_sizes": list(self.task_sizes),
            "epochs_per_task": self.epochs_per_task,
            "class_order": None if self.class_order is None else list(self.class_order),
            "class_names": None if self.class_names is None else list(self.class_names),
        }

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TaskSchedule:
        """Inverse of `to_dict`; unknown keys are refused (they would be silently lost otherwise)."""
        if isinstance(values, TaskSchedule):
            return values
        if not isinstance(values, Mapping):
            raise TypeError(f"a TaskSchedule is read from a mapping, got {type(values).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown TaskSchedule field(s) {unknown}; known: {sorted(known)}")
        if "task_sizes" not in values:
            raise ValueError("a TaskSchedule needs task_sizes")
        return cls(**dict(values))

    def __repr__(self) -> str:
        order = "None" if self.class_order is None else f"<{len(self.class_order)} labels>"
        names = "None" if self.class_names is None else f"<{len(self.class_names)} names>"
        return (f"TaskSchedule(task_sizes={list(self.task_sizes)}, epochs_per_task={self.epochs_per_task}, "
                f"class_order={order}, class_names={names})")

    def _check_task(self, task: int) -> None:
        if not 0 <= task < self.num_tasks:
            raise IndexError(f"task {task} out of range for a schedule of {self.num_tasks} tasks")


def _int_tuple(values: Any, name: str) -> tuple[int, ...]:
    try:
        if isinstance(values, (str, bytes)):
            raise TypeError
        items = list(values)
        if any(isinstance(v, (bool, str, bytes)) or int(v) != v for v in items):
            raise TypeError
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a list of integers, got {values!r}") from None
    return tuple(int(v) for v in items)
