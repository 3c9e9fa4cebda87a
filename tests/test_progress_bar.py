"""The training loss on the progress bar without a device synchronisation per step (`ThrottledRichProgressBar`)."""

from __future__ import annotations

import math
from pathlib import Path

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


def test_a_run_stopped_by_a_callback_logs_that_steps_own_prompt_loss(tmp_path):
    """Lightning writes the metrics of the step at which a callback stops the run (``should_stop`` set in
    ``on_train_batch_end``, as its ``Timer`` does): the prompt loss written there is that step's, the same value a run
    logging every step writes (not the value cached at the previous logging step)."""
    from lightning.pytorch import Callback, Trainer, seed_everything
    from lightning.pytorch.loggers import CSVLogger

    from cdl_lightning.data import ContinualDataModule, SyntheticShapes
    from cdl_lightning.models import PromptLearner
    from cdl_lightning.nn import BackboneConfig, CodaPrompt

    class StopAtStep(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 5:
                trainer.should_stop = True

    def prompt_losses(every: int, callbacks: list) -> dict[int, float]:
        seed_everything(0)
        data = ContinualDataModule(SyntheticShapes(num_classes=4, train_per_class=24, test_per_class=2), num_tasks=2,
                                   batch_size=4, image_size=32)
        tiny = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
        vit = BackboneConfig(name="vit_tiny_patch16_224", model_kwargs=tiny)
        model = PromptLearner(backbone=vit, prompt=lambda d, k, n: CodaPrompt(d, k, n, pool_size=8, layers=(0, 1),
                                                                            ortho_weight=1.0),
                              lr=0.05, **data.model_kwargs())
        logger = CSVLogger(tmp_path, name=f"every{every}_{len(callbacks)}")
        Trainer(accelerator="cpu", logger=logger, log_every_n_steps=every, enable_progress_bar=False,
                enable_model_summary=False, enable_checkpointing=False, callbacks=callbacks,
                **{**data.trainer_kwargs(), "max_epochs": 1}).fit(model, data)
        rows = (Path(logger.log_dir) / "metrics.csv").read_text().splitlines()
        header = rows[0].split(",")
        values = [dict(zip(header, row.split(","))) for row in rows[1:]]
        return {int(v["step"]): float(v["train/prompt_loss"]) for v in values if v.get("train/prompt_loss")}

    every_step = prompt_losses(1, [])
    stopped = prompt_losses(4, [StopAtStep()])
    assert sorted(stopped) == [3, 4]  # the logging step (4th batch) and the stop (global step 5 after the 5th batch)
    assert len(set(every_step.values())) > 3  # the ortho penalty moves every step: a stale value would show
    assert stopped == {step: every_step[step] for step in stopped}
