"""The training loss on the progress bar without a device synchronisation per step (`ThrottledRichProgressBar`)."""

from __future__ import annotations

import math

import lightning.pytorch.trainer.connectors.logger_connector.result as lightning_result
import pytest
from _cli_helpers import small_coda_fit_args

from cdl_lightning.callbacks import ThrottledRichProgressBar
from cdl_lightning.cli import main


def test_the_bar_shows_loss_and_task_and_no_step_converts_a_metric_to_a_number(tmp_path, monkeypatch):
    """Through ``cdl fit`` with its progress bar: Lightning converts ``prog_bar=True`` metrics with ``.item()`` after
    every batch (a sync per step on a GPU); the learner logs none, and the bar still shows the loss (read from
    ``callback_metrics`` when it is drawn) and the current task."""
    conversions = []
    convert = lightning_result.convert_tensors_to_scalars

    def counted(value):
        conversions.append(value)
        return convert(value)

    monkeypatch.setattr(lightning_result, "convert_tensors_to_scalars", counted)
    shown: list[dict] = []
    get_metrics = ThrottledRichProgressBar.get_metrics

    def recorded(self, trainer, pl_module):
        items = get_metrics(self, trainer, pl_module)
        if trainer.training:
            shown.append({**items, "_global_step": trainer.global_step})
        return items

    monkeypatch.setattr(ThrottledRichProgressBar, "get_metrics", recorded)
    main(small_coda_fit_args(tmp_path, "--trainer.enable_progress_bar", "true"))
    assert conversions == []  # no metric was converted per step by the logger connector
    # 3 tasks x 2 epochs of 4 batches, update_every=20: drawn after the first and the last batch of each epoch, and
    # at the epoch's end
    assert [s["_global_step"] for s in shown if "train/loss" in s][:6] == [1, 4, 4, 5, 8, 8]
    assert sorted({s["task"] for s in shown}) == [0, 1, 2]
    losses = [s["train/loss"] for s in shown if "train/loss" in s]
    assert len(losses) >= 12 and all(isinstance(v, float) and math.isfinite(v) and v > 0 for v in losses)


def test_the_bar_reads_only_the_named_metrics_and_checks_its_arguments():
    with pytest.raises(ValueError, match="update_every must be >= 1"):
        ThrottledRichProgressBar(update_every=0)
    assert ThrottledRichProgressBar().metrics == ["train/loss"]
    assert ThrottledRichProgressBar(metrics=("train/loss", "train/prompt_loss")).metrics == [
        "train/loss", "train/prompt_loss"]


def test_the_training_metrics_reach_the_logger_at_the_same_steps(tmp_path):
    """The loss is logged every step, the prompt loss and the task only on the steps the logger writes
    (``log_every_n_steps``): TensorBoard holds all three at exactly the same steps, with the task of each step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    main(small_coda_fit_args(tmp_path, "--trainer.log_every_n_steps", "3"))
    events = EventAccumulator(str(tmp_path / "run")).Reload()
    scalars = {tag: events.Scalars(tag) for tag in ("train/loss", "train/prompt_loss", "train/task")}
    steps = [e.step for e in scalars["train/loss"]]
    # 3 tasks x 2 epochs x 4 batches = 24 steps; Lightning writes every third
    assert steps == [2, 5, 8, 11, 14, 17, 20, 23]
    assert [e.step for e in scalars["train/prompt_loss"]] == steps
    assert [e.step for e in scalars["train/task"]] == steps
    assert [e.value for e in scalars["train/task"]] == [step // 8 for step in steps]  # 8 steps per task
    assert all(math.isfinite(e.value) for e in scalars["train/prompt_loss"])
