"""Pure split functions: class order, task sizes, remapping, per-class split."""

import numpy as np
import pytest

from cdl_lightning.data.splits import (
    interleave_classes,
    inverse_class_order,
    remap_labels,
    resolve_class_order,
    split_per_class,
    task_of_labels,
    task_offsets,
    task_ranges,
    task_sample_indices,
    task_sizes,
)


def test_class_order_natural_and_random():
    assert resolve_class_order(5, "natural") == [0, 1, 2, 3, 4]
    order = resolve_class_order(100, "random", seed=3)
    assert sorted(order) == list(range(100)) and order != list(range(100))
    assert order == resolve_class_order(100, "random", seed=3)
    assert order != resolve_class_order(100, "random", seed=4)
    assert order == [int(c) for c in np.random.default_rng(3).permutation(100)]
    assert resolve_class_order(4, [3, 1, 0, 2]) == [3, 1, 0, 2]


@pytest.mark.parametrize(
    ("order", "message"),
    [
        ([0, 1, 1, 3], r"duplicates: \[1\]"),
        ([0, 1, 2], r"missing: \[3\]"),
        ([0, 1, 2, 7], r"out of range \[0, 4\): \[7\]"),
        ([0, 1, 2, 3, 4], "5 entries"),
        ("sorted", "must be 'natural', 'random'"),
    ],
)
def test_class_order_invalid(order, message):
    with pytest.raises(ValueError, match=message):
        resolve_class_order(4, order)


def test_task_sizes():
    assert task_sizes(100, 10) == [10] * 10
    assert task_sizes(200, 10) == [20] * 10
    assert task_sizes(100, 6, first_task_classes=50) == [50, 10, 10, 10, 10, 10]
    assert task_sizes(10, 1) == [10]
    assert sum(task_sizes(30, 4, first_task_classes=6)) == 30
    with pytest.raises(ValueError, match=r"num_tasks that work: \[1, 2, 4, 5, 10, 20, 25, 50, 100\]"):
        task_sizes(100, 3)
    with pytest.raises(ValueError, match=r"first_task_classes that work with num_tasks=3: \[2, 4, 6, 8\]"):
        task_sizes(10, 3, first_task_classes=5)
    with pytest.raises(ValueError, match="every task needs a class"):
        task_sizes(3, 4)


def test_remap_gives_contiguous_task_ranges():
    order = [4, 2, 0, 5, 1, 3]
    sizes = [2, 2, 2]
    labels = np.array([0, 1, 2, 3, 4, 5, 4, 4])
    remapped = remap_labels(labels, order)
    assert remapped.tolist() == [2, 4, 1, 5, 0, 3, 0, 0]
    assert inverse_class_order(order)[order].tolist() == list(range(6))
    assert task_offsets(sizes) == [0, 2, 4]
    assert task_ranges(sizes) == [(0, 2), (2, 4), (4, 6)]
    assert task_of_labels(remapped, sizes).tolist() == [1, 2, 0, 2, 0, 1, 0, 0]
    # task 0 = original classes {4, 2}
    assert task_sample_indices(remapped, sizes, 0).tolist() == [2, 4, 6, 7]
    assert task_sample_indices(remapped, sizes, [1, 2]).tolist() == [0, 1, 3, 5]
    assert task_of_labels([0, 49, 50, 59, 99], [50, 10, 10, 10, 10, 10]).tolist() == [0, 0, 1, 1, 5]


def test_split_per_class_deterministic_disjoint():
    targets = np.repeat(np.arange(5), [10, 20, 5, 1, 2])
    train, test = split_per_class(targets, 0.8, seed=1)
    assert np.intersect1d(train, test).size == 0
    assert np.union1d(train, test).tolist() == list(range(len(targets)))
    counts = [(np.sum(targets[train] == c), np.sum(targets[test] == c)) for c in range(5)]
    assert counts == [(8, 2), (16, 4), (4, 1), (1, 0), (1, 1)]
    again = split_per_class(targets, 0.8, seed=1)
    assert np.array_equal(again[0], train) and np.array_equal(again[1], test)
    other = split_per_class(targets, 0.8, seed=2)
    assert not np.array_equal(other[0], train)
    # a class's split does not depend on the other classes
    only_class_1 = split_per_class(targets[targets == 1], 0.8, seed=1)[0] + 10
    assert np.array_equal(only_class_1, train[targets[train] == 1])
    with pytest.raises(ValueError, match="train_fraction"):
        split_per_class(targets, 1.0)


def test_interleave_classes():
    labels = np.array([2, 2, 0, 0, 0, 1, 2])
    order = interleave_classes(labels)
    assert order.tolist() == [2, 5, 0, 3, 1, 4, 6]
    assert labels[order].tolist() == [0, 1, 2, 0, 2, 0, 2]
    assert interleave_classes([]).tolist() == []
