"""Pure functions that turn a labelled data set into a class-incremental task sequence.

Nothing here imports torch: every function works on Python lists and numpy arrays, so the split can be computed (and
checked) before any image is decoded.

Vocabulary used across ``cdl_lightning.data``:

- *original label*: the label a source stores (CIFAR-100 fine label, ImageFolder class index, ...).
- *class order*: a permutation ``order`` of ``range(num_classes)``; ``order[i]`` is the original label that becomes
  *remapped label* ``i``. The reference code uses the natural order ``0..C-1``.
- *task sizes*: number of classes per task; task ``t`` owns the contiguous remapped range
  ``[offset_t, offset_t + size_t)`` with ``offset_t = sum(sizes[:t])`` (`cdl_lightning.tasks.task_offsets`, re-exported
  here; `cdl_lightning.tasks.TaskSchedule` bundles sizes, order, names and epochs).
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np

from cdl_lightning.tasks import task_offsets, task_ranges  # computed in one place (the task schedule's module)

#: A class selection (see `select_classes`): a list of class names / indices, or a seeded random subset
#: ``{random: k, seed: s}`` / permutation slice ``{seed: s, start: a, stop: b}``.
ClassSelection = list[int | str] | dict[str, int]

__all__ = [
    "ClassSelection",
    "select_classes",
    "class_indices",
    "resolve_class_order",
    "task_sizes",
    "task_offsets",
    "task_ranges",
    "inverse_class_order",
    "remap_labels",
    "task_of_labels",
    "task_sample_indices",
    "interleave_classes",
    "split_per_class",
]


def class_indices(
    names_or_indices: Sequence[int | str],
    class_names: Sequence[str] | None,
    what: str = "classes",
    class_ids: Sequence[str] | None = None,
) -> list[int]:
    """Class indices of a list mixing indices (ints, or strings of digits that are not a class name) and class names.

    A name is looked up as a full class name, then as a class id (``class_ids``, e.g. the WordNet ids of
    Tiny-ImageNet), then as the part of a class name before its first comma when that is unique (``goldfish`` for
    ``"goldfish, Carassius auratus"``).

    Raises:
        ValueError: An unknown name (the message lists the closest names, ``difflib``).
    """
    names = [str(n) for n in class_names] if class_names is not None else None
    lookup: dict[str, int] = {}
    if names is not None:
        short = [n.split(",")[0].strip() for n in names]
        unique_short = {s: i for i, s in enumerate(short) if short.count(s) == 1}
        for table in (unique_short, {str(c): i for i, c in enumerate(class_ids or [])}, {n: i for i, n in
                                                                                         enumerate(names)}):
            lookup.update(table)  # later tables win: full names, then ids, then short names
    out: list[int] = []
    problems: list[str] = []
    for entry in names_or_indices:
        if isinstance(entry, (bool, np.bool_)):
            raise ValueError(f"{what}: {entry!r} is neither a class name nor an index")
        if isinstance(entry, (int, np.integer)):
            out.append(int(entry))
            continue
        text = str(entry)
        if text in lookup:
            out.append(lookup[text])
        elif text.lstrip("-").isdigit():
            out.append(int(text))
        else:
            close = difflib.get_close_matches(text, list(lookup), n=3, cutoff=0.6)
            hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
            problems.append(f"unknown class name {text!r}{hint}")
    if problems:
        shown = "" if names is None else f"; the {len(names)} class names begin {_short_names(names)}"
        raise ValueError(f"{what}: " + "; ".join(problems) + shown)
    return out


def select_classes(
    class_names: Sequence[str], classes: ClassSelection | None = None, class_ids: Sequence[str] | None = None
) -> list[int] | None:
    """The original class indices a source keeps, in the order they get their new labels ``0..k-1``.

    ``classes`` is one of:

    - ``None``: every class (returns ``None``);
    - a list of class names and/or indices, e.g. ``[n01443537, n01629819]`` or ``[0, 5, 7]``: those classes, in that
      order (new label ``i`` is entry ``i``);
    - ``{random: k, seed: s}``: ``k`` classes drawn without replacement, i.e. the first ``k`` entries of
      ``numpy.random.default_rng(s).permutation(num_classes)`` (in that order);
    - ``{seed: s, start: a, stop: b}``: entries ``[a, b)`` of that permutation, i.e. exactly
      ``numpy.random.default_rng(s).permutation(num_classes)[a:b]`` (``start`` defaults to 0, ``stop`` to
      ``num_classes``; ``random: k`` with ``start: a`` means ``stop = a + k``). Two complementary slices of one seed
      (``{seed: 0, stop: 102}`` and ``{seed: 0, start: 102}``) split the classes into disjoint sets: e.g. pretrain on
      the first and run the continual study on the second.

    Args:
        class_names: Names of all classes of the source (index = original label).
        classes: The selection.
        class_ids: Other identifiers of the classes that names may use (e.g. WordNet ids), see `class_indices`.

    Returns:
        ``None`` for all classes, else the kept original labels (distinct ints).

    Raises:
        ValueError: Unknown names (with close matches), indices out of range, duplicates, an empty selection or unknown
            keys in the mapping form.
    """
    if classes is None:
        return None
    num_classes = len(class_names)
    if isinstance(classes, Mapping):
        unknown = sorted(set(classes) - {"random", "seed", "start", "stop"})
        if unknown or "seed" not in classes:
            raise ValueError(
                f"classes: a mapping selects a seeded random subset, {{random: K, seed: S}} or {{seed: S, start: A, "
                f"stop: B}} (the slice [A, B) of numpy.random.default_rng(S).permutation(num_classes)); got "
                f"{dict(classes)}" + (f" with unknown keys {unknown}" if unknown else " without 'seed'")
            )
        start = int(classes.get("start", 0))
        if "random" in classes:
            if "stop" in classes:
                raise ValueError("classes: give either 'random' (a count) or 'stop', not both")
            stop = start + int(classes["random"])
        else:
            stop = int(classes.get("stop", num_classes))
        if not 0 <= start < stop <= num_classes:
            raise ValueError(
                f"classes: the slice [{start}, {stop}) of a permutation of {num_classes} classes is empty or out of "
                f"range; need 0 <= start < stop <= {num_classes}"
            )
        permutation = np.random.default_rng(int(classes["seed"])).permutation(num_classes)
        return [int(c) for c in permutation[start:stop]]
    if isinstance(classes, (str, bytes)):
        raise ValueError(f"classes must be a list of class names or indices (or a mapping), got the string {classes!r}")
    selected = class_indices(list(classes), class_names, "classes", class_ids)
    if not selected:
        raise ValueError("classes: the selection is empty (leave it unset to keep every class)")
    out_of_range = sorted({c for c in selected if not 0 <= c < num_classes})
    if out_of_range:
        raise ValueError(f"classes: indices out of range [0, {num_classes}): {_short(out_of_range)}")
    counts: dict[int, int] = {}
    for c in selected:
        counts[c] = counts.get(c, 0) + 1
    duplicates = [class_names[c] for c, n in counts.items() if n > 1]
    if duplicates:
        raise ValueError(f"classes: listed more than once: {duplicates[:10]}")
    return selected


def resolve_class_order(
    num_classes: int,
    class_order: Literal["natural", "random"] | Sequence[int | str] = "natural",
    seed: int = 0,
    class_names: Sequence[str] | None = None,
    class_ids: Sequence[str] | None = None,
) -> list[int]:
    """Resolve a class-order setting into an explicit permutation of ``range(num_classes)``.

    Args:
        num_classes: Number of classes of the source.
        class_order: ``"natural"`` (``0..C-1``, the reference's order), ``"random"`` (a permutation drawn from
            ``numpy.random.default_rng(seed)``) or an explicit list where entry ``i`` is the original label (or the
            class name, when ``class_names`` is given) that becomes remapped label ``i``.
        seed: Seed of the ``"random"`` permutation.
        class_names: Names of the source's classes, to resolve names in an explicit list (unknown names are an error
            listing close matches).
        class_ids: Other identifiers of the classes (e.g. WordNet ids), see `class_indices`.

    Returns:
        The class order as a list of ints.

    Raises:
        ValueError: Unknown keyword, or an explicit list that is not a permutation of ``range(num_classes)`` (the
            message names the duplicates, missing and out-of-range entries).
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if isinstance(class_order, str):
        if class_order == "natural":
            return list(range(num_classes))
        if class_order == "random":
            return [int(c) for c in np.random.default_rng(seed).permutation(num_classes)]
        raise ValueError(
            f"class_order must be 'natural', 'random' or a list of class indices or names, got {class_order!r}"
        )
    order = class_indices(list(class_order), class_names, "class_order", class_ids)
    problems = []
    if len(order) != num_classes:
        problems.append(f"it has {len(order)} entries but the source has {num_classes} classes")
    out_of_range = sorted({c for c in order if not 0 <= c < num_classes})
    if out_of_range:
        problems.append(f"out of range [0, {num_classes}): {_short(out_of_range)}")
    counts: dict[int, int] = {}
    for c in order:
        counts[c] = counts.get(c, 0) + 1
    duplicates = sorted(c for c, n in counts.items() if n > 1)
    if duplicates:
        problems.append(f"duplicates: {_short(duplicates)}")
    missing = sorted(set(range(num_classes)) - set(order))
    if missing:
        problems.append(f"missing: {_short(missing)}")
    if problems:
        raise ValueError(f"class_order is not a permutation of range({num_classes}): " + "; ".join(problems))
    return order


def task_sizes(num_classes: int, num_tasks: int, first_task_classes: int | None = None) -> list[int]:
    """Number of classes of each task.

    Without ``first_task_classes`` the classes are split equally (``num_classes % num_tasks == 0`` required). With it,
    task 0 gets ``first_task_classes`` classes and the remaining classes are split equally over the other tasks.

    Args:
        num_classes: Number of classes of the source.
        num_tasks: Number of tasks (>= 1).
        first_task_classes: Classes of the first task, or ``None`` for an equal split.

    Returns:
        A list of ``num_tasks`` positive ints that sum to ``num_classes``.

    Raises:
        ValueError: When the classes cannot be split evenly; the message lists the numbers that would work.
    """
    if num_tasks < 1:
        raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
    if num_classes < num_tasks:
        raise ValueError(f"cannot split {num_classes} classes into {num_tasks} tasks: every task needs a class")
    if first_task_classes is None:
        if num_classes % num_tasks:
            divisors = [n for n in range(1, num_classes + 1) if num_classes % n == 0]
            raise ValueError(
                f"cannot split {num_classes} classes evenly into {num_tasks} tasks; num_tasks that work: {divisors} "
                f"(or set first_task_classes, e.g. {num_classes - (num_tasks - 1) * (num_classes // num_tasks)} "
                f"gives {num_tasks - 1} tasks of {num_classes // num_tasks})"
            )
        return [num_classes // num_tasks] * num_tasks
    if not 1 <= first_task_classes <= num_classes:
        raise ValueError(f"first_task_classes must be in [1, {num_classes}], got {first_task_classes}")
    rest = num_classes - first_task_classes
    if num_tasks == 1:
        if rest:
            raise ValueError(f"with num_tasks=1, first_task_classes must equal num_classes={num_classes}")
        return [num_classes]
    if rest < num_tasks - 1 or rest % (num_tasks - 1):
        working = [f for f in range(1, num_classes) if (num_classes - f) % (num_tasks - 1) == 0]
        working = [f for f in working if num_classes - f >= num_tasks - 1]
        raise ValueError(
            f"cannot split the {rest} classes left after first_task_classes={first_task_classes} evenly into "
            f"{num_tasks - 1} tasks; first_task_classes that work with num_tasks={num_tasks}: {_short(working)}"
        )
    return [first_task_classes] + [rest // (num_tasks - 1)] * (num_tasks - 1)


def inverse_class_order(class_order: Sequence[int]) -> np.ndarray:
    """Lookup table ``inv`` with ``inv[original_label] = remapped_label`` (int64)."""
    inv = np.empty(len(class_order), dtype=np.int64)
    inv[np.asarray(class_order, dtype=np.int64)] = np.arange(len(class_order))
    return inv


def remap_labels(labels: np.ndarray | Sequence[int], class_order: Sequence[int]) -> np.ndarray:
    """Map original labels to remapped labels (``order[i]`` becomes ``i``); returns int64."""
    return inverse_class_order(class_order)[np.asarray(labels, dtype=np.int64)]


def task_of_labels(remapped: np.ndarray | Sequence[int], sizes: Sequence[int]) -> np.ndarray:
    """Task id (int64) of each remapped label."""
    bounds = np.cumsum(sizes)
    return np.searchsorted(bounds, np.asarray(remapped, dtype=np.int64), side="right").astype(np.int64)


def task_sample_indices(remapped: np.ndarray, sizes: Sequence[int], tasks: int | Sequence[int]) -> np.ndarray:
    """Indices (sorted, int64) of the samples whose remapped label belongs to ``tasks`` (one task id or several)."""
    wanted = np.atleast_1d(np.asarray(tasks, dtype=np.int64))
    return np.flatnonzero(np.isin(task_of_labels(remapped, sizes), wanted)).astype(np.int64)


def interleave_classes(labels: np.ndarray | Sequence[int]) -> np.ndarray:
    """Order (int64 positions) that interleaves the classes: the first sample of every class (by label), then the second
    of every class, and so on; within a class the input order is kept.

    Every prefix of the reordered samples is then (nearly) class-balanced, so evaluating only the first batches
    (``limit_val_batches``) still covers every class and task.
    """
    labels = np.asarray(labels, dtype=np.int64)
    by_class = np.argsort(labels, kind="stable")
    sorted_labels = labels[by_class]
    rank = np.empty(len(labels), dtype=np.int64)
    rank[by_class] = np.arange(len(labels)) - np.searchsorted(sorted_labels, sorted_labels, side="left")
    return np.lexsort((labels, rank)).astype(np.int64)


def split_per_class(
    targets: np.ndarray | Sequence[int], train_fraction: float = 0.8, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded per-class train/test split of a labelled set without one (ImageNet-R in the CODA-Prompt reference).

    Within each class the samples are permuted with ``numpy.random.default_rng([seed, class])`` and the first
    ``round(train_fraction * n)`` go to train (at least one sample stays on each side when the class has two or more),
    so the split of one class does not depend on the other classes.

    Args:
        targets: Label of each sample.
        train_fraction: Fraction of each class that goes to the training split, in (0, 1).
        seed: Seed of the split.

    Returns:
        ``(train_indices, test_indices)``: disjoint sorted int64 index arrays covering every sample.
    """
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
    targets = np.asarray(targets, dtype=np.int64)
    train, test = [], []
    for c in np.unique(targets):
        idx = np.flatnonzero(targets == c)
        idx = idx[np.random.default_rng([seed, int(c)]).permutation(len(idx))]
        n_train = int(round(train_fraction * len(idx)))
        if len(idx) >= 2:
            n_train = min(max(n_train, 1), len(idx) - 1)
        train.append(idx[:n_train])
        test.append(idx[n_train:])
    empty = np.empty(0, dtype=np.int64)
    return (
        np.sort(np.concatenate(train)) if train else empty,
        np.sort(np.concatenate(test)) if test else empty,
    )


def _short_names(names: Sequence[str], limit: int = 8) -> str:
    return "[" + ", ".join(repr(n) for n in names[:limit]) + (", ...]" if len(names) > limit else "]")


def _short(values: Sequence[int], limit: int = 12) -> str:
    values = list(values)
    text = ", ".join(str(v) for v in values[:limit])
    return f"[{text}{', ...' if len(values) > limit else ''}]"
