"""TaskAccuracy and the functional accuracy-matrix metrics against hand computations."""

import math

import numpy as np
import pytest
import torch

from cdl_lightning.metrics import (
    MATRIX_METRICS,
    TaskAccuracy,
    average_accuracy,
    backward_transfer,
    forgetting,
    last_filled_row,
    metric_curves,
    per_task_accuracy,
    reference_forgetting,
)
from cdl_lightning.metrics.functional import _task_accuracy_compute, _task_accuracy_update

NAN = math.nan

# R[t, j]: accuracy on task j after training task t.
R = [
    [90.0, NAN, NAN],
    [80.0, 70.0, NAN],
    [60.0, 65.0, 50.0],
]
# Task 0 improves after task 1, so max_{l<t} R[l, 0] != R[0, 0].
R_IMPROVED = [
    [80.0, NAN, NAN],
    [90.0, 70.0, NAN],
    [60.0, 65.0, 50.0],
]


# ---------------------------------------------------------------- TaskAccuracy
def test_task_accuracy_counts_match_hand_computation():
    metric = TaskAccuracy(num_tasks=3)
    # batch 1: task 0: 2/3 right, task 1: 0/1 right
    metric.update(torch.tensor([0, 1, 1, 3]), torch.tensor([0, 1, 0, 2]), torch.tensor([0, 0, 0, 1]))
    # batch 2: task 1: 2/2 right, task 0: 1/1 right
    metric.update(torch.tensor([2, 3, 0]), torch.tensor([2, 3, 0]), torch.tensor([1, 1, 0]))
    correct, total = metric.counts()
    assert correct.tolist() == [3, 2, 0]
    assert total.tolist() == [4, 3, 0]
    assert correct.dtype == total.dtype == torch.long
    accuracy = metric.compute()
    assert accuracy.dtype == torch.float32
    assert accuracy[:2].tolist() == pytest.approx([75.0, 200.0 / 3.0])
    assert math.isnan(accuracy[2].item())  # no sample of task 2


def test_functional_task_accuracy_is_what_the_metric_computes():
    preds, targets = torch.tensor([0, 1, 1, 3, 2]), torch.tensor([0, 1, 0, 2, 2])
    task_ids = torch.tensor([0, 0, 0, 1, 1])
    correct, total = _task_accuracy_update(preds, targets, task_ids, num_tasks=3)
    assert correct.tolist() == [2, 1, 0] and total.tolist() == [3, 2, 0]
    metric = TaskAccuracy(3)
    metric.update(preds, targets, task_ids)
    torch.testing.assert_close(metric.compute(), per_task_accuracy(preds, targets, task_ids, 3), equal_nan=True)
    accuracy = _task_accuracy_compute(correct.double(), total.double())  # float counts keep their dtype
    assert accuracy.dtype == torch.float64 and accuracy[:2].tolist() == [200.0 / 3.0, 50.0]
    assert math.isnan(accuracy[2].item())
    with pytest.raises(ValueError, match="Task ids must lie in"):
        _task_accuracy_update(preds, targets, task_ids + 2, num_tasks=3)


def test_task_accuracy_logits_equal_predictions():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 7, generator=generator)
    targets = torch.randint(0, 7, (50,), generator=generator)
    task_ids = torch.randint(0, 4, (50,), generator=generator)
    from_logits, from_preds = TaskAccuracy(4), TaskAccuracy(4)
    from_logits.update(logits, targets, task_ids)
    from_preds.update(logits.argmax(dim=1), targets, task_ids)
    assert torch.equal(from_logits.correct, from_preds.correct)
    assert torch.equal(from_logits.total, from_preds.total)
    hits = logits.argmax(dim=1) == targets
    for task in range(4):
        in_task = task_ids == task
        assert from_logits.total[task] == in_task.sum()
        assert from_logits.correct[task] == (hits & in_task).sum()
    from_logits.reset()
    assert from_logits.total.sum() == 0


def test_task_accuracy_validates_arguments():
    metric = TaskAccuracy(num_tasks=2)
    with pytest.raises(ValueError, match="Task ids must lie"):
        metric.update(torch.tensor([0, 1]), torch.tensor([0, 1]), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="Batch sizes differ"):
        metric.update(torch.tensor([0, 1]), torch.tensor([0]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="positive"):
        TaskAccuracy(num_tasks=0)


# ---------------------------------------------------------------- functional
@pytest.mark.parametrize("convert", [lambda r: r, np.array, torch.tensor, lambda r: torch.tensor(r).float()])
def test_average_accuracy(convert):
    matrix = convert(R)
    assert average_accuracy(matrix, 0) == 90.0
    assert average_accuracy(matrix, 1) == 75.0
    assert average_accuracy(matrix, 2) == pytest.approx(175.0 / 3.0)
    assert average_accuracy(matrix) == pytest.approx(175.0 / 3.0)  # last filled row
    assert isinstance(average_accuracy(matrix), float)


def test_forgetting_chaudhry():
    assert forgetting(R, 0) == 0.0
    assert forgetting(R, 1) == 10.0  # 90 - 80
    assert forgetting(R, 2) == 17.5  # ((max(90, 80) - 60) + (70 - 65)) / 2
    assert forgetting(R_IMPROVED, 1) == -10.0  # 80 - 90
    assert forgetting(R_IMPROVED, 2) == 17.5  # ((max(80, 90) - 60) + (70 - 65)) / 2: the max, not R[0, 0]


def test_reference_forgetting():
    assert reference_forgetting(R, 0) == 0.0
    assert reference_forgetting(R, 1) == 5.0  # ((90 - 80) + (70 - 70)) / 2
    assert reference_forgetting(R, 2) == pytest.approx(35.0 / 3.0)  # ((90 - 60) + (70 - 65) + 0) / 3
    assert reference_forgetting(R_IMPROVED, 2) == pytest.approx(25.0 / 3.0)  # ((80 - 60) + (70 - 65) + 0) / 3


def test_reference_forgetting_matches_cdl_reference_code():
    # The CDL reference (trainer.py) stores task_acc_pre[i] = accuracy on task i right after learning it, and after the
    # last task prints sum(task_acc_pre - final_row) / num_tasks.
    rng = np.random.default_rng(0)
    num_tasks = 5
    matrix = np.tril(rng.uniform(20, 100, size=(num_tasks, num_tasks)))
    matrix[np.triu_indices(num_tasks, 1)] = np.nan
    task_acc_pre = np.array([matrix[i, i] for i in range(num_tasks)])
    expected = np.sum(task_acc_pre - matrix[-1]) / num_tasks
    assert reference_forgetting(matrix) == pytest.approx(expected)
    for t in range(1, num_tasks):  # F^r_t = -BWT_t * t / (t + 1)
        assert reference_forgetting(matrix, t) == pytest.approx(-backward_transfer(matrix, t) * t / (t + 1))


def test_backward_transfer():
    assert backward_transfer(R, 0) == 0.0
    assert backward_transfer(R, 1) == -10.0  # 80 - 90
    assert backward_transfer(R, 2) == -17.5  # ((60 - 90) + (65 - 70)) / 2
    assert backward_transfer(R_IMPROVED, 2) == -12.5  # ((60 - 80) + (65 - 70)) / 2


def test_registry_lists_each_metric_once_with_its_function():
    assert [m.key for m in MATRIX_METRICS] == ["avg_acc", "forgetting", "ref_forgetting", "bwt"]
    assert len({m.column for m in MATRIX_METRICS}) == len(MATRIX_METRICS)
    functions = [average_accuracy, forgetting, reference_forgetting, backward_transfer]
    assert [m.fn for m in MATRIX_METRICS] == functions
    assert metric_curves(R) == {m.key: [m.fn(R, t) for t in range(3)] for m in MATRIX_METRICS}


def test_partial_matrix_and_curves():
    partial = torch.tensor(R)
    partial[2] = NAN  # only tasks 0 and 1 done
    assert last_filled_row(partial) == 1
    assert average_accuracy(partial) == 75.0
    assert forgetting(partial) == 10.0
    assert math.isnan(average_accuracy(partial, 2))
    assert last_filled_row(torch.full((3, 3), NAN)) is None
    assert math.isnan(forgetting(torch.full((3, 3), NAN)))
    curves = metric_curves(partial)
    assert curves["avg_acc"][:2] == [90.0, 75.0] and math.isnan(curves["avg_acc"][2])
    assert curves["forgetting"][:2] == [0.0, 10.0]
    assert curves["ref_forgetting"][:2] == [0.0, 5.0]
    assert curves["bwt"][:2] == [0.0, -10.0]
    with pytest.raises(ValueError, match="square"):
        average_accuracy(torch.zeros(2, 3))
    with pytest.raises(IndexError):
        average_accuracy(R, 3)
