"""`TaskSchedule` (values, round trip, errors), the evaluated epoch outside fit, and checkpoints written before the
schedule existed (``cdl validate --ckpt_path`` with the old hyper-parameter layout)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from _cli_helpers import TINY_BACKBONE, as_args, cpu_run_options

from cdl_lightning.cli import cli_main
from cdl_lightning.models import PromptLearner
from cdl_lightning.models.learner import as_task_schedule
from cdl_lightning.progress import checkpoint_epochs_trained, evaluated_epoch
from cdl_lightning.tasks import TaskSchedule, task_of_epoch, task_offsets

NAMES = ("a", "b", "c", "d", "e", "f", "g", "h")


# ================================================================================================== TaskSchedule
def test_schedule_values():
    schedule = TaskSchedule(task_sizes=[4, 2, 2], epochs_per_task=3, class_order=[7, 6, 5, 4, 3, 2, 1, 0],
                            class_names=NAMES)
    assert schedule.task_sizes == (4, 2, 2) and schedule.class_order == (7, 6, 5, 4, 3, 2, 1, 0)
    assert schedule.num_tasks == 3 and schedule.num_classes == 8 and schedule.max_epochs == 9
    assert schedule.offsets == (0, 4, 6, 8) and list(schedule.offsets[:-1]) == task_offsets([4, 2, 2])
    assert [schedule.task_range(t) for t in range(3)] == [(0, 4), (4, 6), (6, 8)]
    assert list(schedule.classes(1)) == [4, 5] and list(schedule.seen_classes(1)) == [0, 1, 2, 3, 4, 5]
    assert [schedule.task_of(e) for e in range(11)] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2]  # clamped to the last task
    assert [schedule.is_last_epoch_of_task(e) for e in range(6)] == [False, False, True, False, False, True]
    assert [schedule.epoch_in_task(e) for e in range(5)] == [0, 1, 2, 0, 1]
    assert [schedule.task_after(n) for n in (0, 1, 3, 4, 9, 12)] == [0, 0, 0, 1, 2, 2]
    assert task_of_epoch(5, 3, 3) == schedule.task_of(5) == 1
    assert TaskSchedule([2, 2]).names == ("0", "1", "2", "3") and schedule.names == NAMES
    assert "task_sizes=[4, 2, 2]" in repr(schedule)


def test_schedule_round_trip_through_a_weights_only_checkpoint(tmp_path):
    schedule = TaskSchedule((3, 3), epochs_per_task=2, class_order=(5, 4, 3, 2, 1, 0), class_names=NAMES[:6])
    plain = schedule.to_dict()
    assert plain == {"task_sizes": [3, 3], "epochs_per_task": 2, "class_order": [5, 4, 3, 2, 1, 0],
                     "class_names": list(NAMES[:6])}
    torch.save({"task_schedule": plain}, tmp_path / "schedule.pt")
    loaded = torch.load(tmp_path / "schedule.pt", weights_only=True)["task_schedule"]
    assert TaskSchedule.from_dict(loaded) == schedule and hash(TaskSchedule.from_dict(loaded)) == hash(schedule)
    assert yaml.safe_load(yaml.safe_dump(plain)) == plain
    assert TaskSchedule.from_dict(schedule) is schedule
    assert TaskSchedule.from_dict({"task_sizes": [1, 1]}) == TaskSchedule((1, 1), 1, None, None)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"task_sizes": []}, "non-empty list of positive class counts"),
    ({"task_sizes": [2, 0]}, "non-empty list of positive class counts"),
    ({"task_sizes": "22"}, "task_sizes must be a list of integers"),
    ({"task_sizes": [2, 2.5]}, "task_sizes must be a list of integers"),
    ({"task_sizes": [2, 2], "epochs_per_task": 0}, "epochs_per_task must be >= 1"),
    ({"task_sizes": [2, 2], "epochs_per_task": 1.5}, "epochs_per_task must be an integer"),
    ({"task_sizes": [2, 2], "class_order": [0, 1, 2, 2]}, r"permutation of range\(4\)"),
    ({"task_sizes": [2, 2], "class_order": [0, 1, 2]}, r"permutation of range\(4\)"),
    ({"task_sizes": [2, 2], "class_names": ["a", "b"]}, "class_names has 2 entries but the tasks hold 4"),
    ({"task_sizes": [2, 2], "class_names": "abcd"}, "one string"),
])
def test_schedule_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TaskSchedule(**kwargs)


def test_schedule_from_dict_and_task_index_errors():
    with pytest.raises(ValueError, match=r"unknown TaskSchedule field\(s\) \['num_tasks'\]"):
        TaskSchedule.from_dict({"task_sizes": [2], "num_tasks": 1})
    with pytest.raises(ValueError, match="needs task_sizes"):
        TaskSchedule.from_dict({"epochs_per_task": 2})
    with pytest.raises(TypeError, match="from a mapping"):
        TaskSchedule.from_dict([2, 2])  # type: ignore[arg-type]
    with pytest.raises(IndexError, match="task 2 out of range for a schedule of 2 tasks"):
        TaskSchedule((2, 2)).task_range(2)
    with pytest.raises(ValueError, match="epoch must be >= 0"):
        TaskSchedule((2, 2)).task_of(-1)


def test_learner_schedule_from_the_old_arguments_and_conflicts():
    schedule = TaskSchedule((2, 2), 3, (0, 1, 2, 3), NAMES[:4])
    assert as_task_schedule(None, [2, 2], 3, list(NAMES[:4]), [0, 1, 2, 3]) == schedule
    assert as_task_schedule(schedule.to_dict()) == schedule
    # the old facts next to the schedule (hyper-parameters of an older checkpoint + the CLI's link) must agree
    assert as_task_schedule(schedule, [2, 2], 3, list(NAMES[:4]), [0, 1, 2, 3]) is schedule
    with pytest.raises(ValueError, match=r"task_sizes, epochs_per_task given next to a task_schedule"):
        as_task_schedule(schedule, task_sizes=[1, 3], epochs_per_task=1)
    with pytest.raises(ValueError, match="task_schedule is required"):
        as_task_schedule(None)


# ============================================================================================ evaluated epoch
def _trainer(fn: str, epoch: int = 0, processed: int = 0, ckpt_path: str | None = None) -> SimpleNamespace:
    progress = SimpleNamespace(current=SimpleNamespace(processed=processed))
    return SimpleNamespace(state=SimpleNamespace(fn=fn), current_epoch=epoch, ckpt_path=ckpt_path,
                           fit_loop=SimpleNamespace(epoch_progress=progress))


def test_evaluated_epoch_inside_and_outside_fit(tmp_path):
    assert evaluated_epoch(_trainer("fit", epoch=5, processed=5)) == 5
    assert evaluated_epoch(_trainer("validate", epoch=6, processed=6)) == 5  # the last trained epoch
    assert evaluated_epoch(_trainer("validate")) == 0  # nothing known: task 0
    checkpoint = {"epoch": 3, "loops": {"fit_loop": {"epoch_progress": {"current": {"processed": 4}}}}}
    assert checkpoint_epochs_trained(checkpoint) == 4 and checkpoint_epochs_trained({"epoch": 2}) == 3
    assert checkpoint_epochs_trained({}) is None
    torch.save(checkpoint, tmp_path / "x.ckpt")
    # a checkpoint being evaluated decides over what this trainer's own fit processed
    assert evaluated_epoch(_trainer("validate", processed=9, ckpt_path=str(tmp_path / "x.ckpt"))) == 3
    (tmp_path / "broken.ckpt").write_bytes(b"not a checkpoint")
    with pytest.warns(UserWarning, match="could not read the training progress"):
        assert evaluated_epoch(_trainer("validate", processed=4, ckpt_path=str(tmp_path / "broken.ckpt"))) == 3


# ====================================================================================== checkpoints of before
def _old_layout(checkpoint: dict) -> dict:
    """The hyper-parameters and ``cdl`` entries as PromptLearner wrote them before `TaskSchedule` existed."""
    schedule = checkpoint["hyper_parameters"].pop("task_schedule")
    checkpoint["hyper_parameters"].update(schedule)
    cdl = checkpoint["cdl"]
    del cdl["task_schedule"]
    cdl.update(task_sizes=schedule["task_sizes"], class_order=schedule["class_order"],
               class_names=schedule["class_names"])
    return checkpoint


def _validate(config: Path, ckpt: Path, out: Path) -> list:
    cli_main(["validate", "--config", str(config), "--ckpt_path", str(ckpt), "--trainer.logger", "false",
              "--evaluation.output_dir", str(out)])
    return json.loads((out / "metrics.json").read_text())["accuracy_matrix"]


def test_saved_config_and_old_checkpoints_validate_through_the_cli(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # `cdl validate` without logger saves its config.yaml in the working directory
    run = tmp_path / "run"
    options = cpu_run_options(tmp_path, "run")
    cli_main(["fit", *as_args(options), "--model.backbone", TINY_BACKBONE, "--data.num_tasks", "2",
              "--data.epochs_per_task", "2", "--data.image_size", "32", "--data.batch_size", "16",
              "--data.source.init_args.num_classes", "4", "--trainer.limit_train_batches", "2",
              "--evaluation.print_table", "false", "--evaluation.log_image", "false",
              "--checkpoint.dirpath", str(run / "checkpoints")])
    fitted = json.loads((run / "metrics.json").read_text())["accuracy_matrix"]
    last = run / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    assert checkpoint["hyper_parameters"]["task_schedule"]["task_sizes"] == [2, 2]
    # the config.yaml that fit saved re-loads, and evaluates the learned tasks (row 1) as the fit did
    assert _validate(run / "config.yaml", last, tmp_path / "new")[1] == fitted[1]

    # a checkpoint in the old layout (task_sizes, epochs_per_task, class_names, class_order as hyper-parameters)
    old = tmp_path / "old.ckpt"
    torch.save(_old_layout(checkpoint), old)
    assert "task_sizes" in torch.load(old, weights_only=True)["hyper_parameters"]
    assert _validate(run / "config.yaml", old, tmp_path / "old")[1] == fitted[1]
    model = PromptLearner.load_from_checkpoint(old, weights_only=True)
    assert model.task_schedule == TaskSchedule.from_dict(_schedule_of(old))
    assert model.task_schedule.task_sizes == (2, 2) and model.task_schedule.epochs_per_task == 2
    assert model.opened_task == 1 and len(model.task_snapshots) == 2

    # an old checkpoint of other data is refused with the reason
    wrong = torch.load(old, weights_only=True)
    wrong["hyper_parameters"]["task_sizes"] = [1, 3]
    torch.save(wrong, tmp_path / "wrong.ckpt")
    with pytest.raises(ValueError, match="task_sizes given next to a task_schedule that says otherwise"):
        _validate(run / "config.yaml", tmp_path / "wrong.ckpt", tmp_path / "wrong")


def _schedule_of(path: Path) -> dict:
    hparams = torch.load(path, weights_only=True)["hyper_parameters"]
    return {key: hparams[key] for key in ("task_sizes", "epochs_per_task", "class_order", "class_names")}
