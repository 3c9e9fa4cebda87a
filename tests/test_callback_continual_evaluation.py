"""ContinualEvaluation in a *foreign* tiny Lightning project (nothing from cdl_lightning.models / .data).

The file doubles as the script of the DDP test: ``python tests/test_callback_continual_evaluation.py OUT_DIR DEVICES``
runs the fixed-weights evaluation under ``strategy="ddp"`` (Lightning re-launches this command line for rank 1).
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch import nn
from torch.nn import functional as F
from torch.utils.data import ConcatDataset, DataLoader, TensorDataset

from cdl_lightning.callbacks.continual_evaluation import ContinualEvaluation

NUM_TASKS = 3
EPOCHS_PER_TASK = 2
CLASSES_PER_TASK = 2
IN_DIM = 8
VAL_SIZES = (33, 35, 33)  # 101 samples: odd per task and in total, so a padding sampler would show


# ---------------------------------------------------------------- the foreign project
def _task_data(task: int, size: int, seed: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed * 100 + task)
    targets = task * CLASSES_PER_TASK + torch.randint(0, CLASSES_PER_TASK, (size,), generator=generator)
    centres = torch.randn(NUM_TASKS * CLASSES_PER_TASK, IN_DIM, generator=torch.Generator().manual_seed(7))
    inputs = centres[targets] + 1.5 * torch.randn(size, IN_DIM, generator=generator)
    return TensorDataset(inputs, targets, torch.full((size,), task, dtype=torch.long))


class ToyTasks(LightningDataModule):
    """Task-incremental synthetic data: train on the current task, validate on all tasks seen."""

    def __init__(self, num_tasks: int = NUM_TASKS, epochs_per_task: int = EPOCHS_PER_TASK, expose: bool = False):
        super().__init__()
        self._num_tasks, self._epochs_per_task = num_tasks, epochs_per_task
        if expose:  # what a datamodule may expose for the callback's defaults
            self.num_tasks, self.epochs_per_task = num_tasks, epochs_per_task
        self.train_sets = [_task_data(t, 64, seed=1) for t in range(num_tasks)]
        self.val_sets = [_task_data(t, VAL_SIZES[t], seed=2) for t in range(num_tasks)]

    def _task(self) -> int:
        return min(self.trainer.current_epoch // self._epochs_per_task, self._num_tasks - 1)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_sets[self._task()], batch_size=16, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return val_loader(ConcatDataset(self.val_sets[: self._task() + 1]), self.trainer)


def val_loader(dataset, trainer: Trainer) -> DataLoader:
    sampler = UnrepeatedDistributedSampler(
        dataset, num_replicas=trainer.world_size, rank=trainer.global_rank, shuffle=False
    )
    return DataLoader(dataset, batch_size=16, sampler=sampler)


class LinearClassifier(LightningModule):
    """Foreign module. ``fixed_weights``: weights drawn from a per-task seed at each task start and never trained."""

    def __init__(self, lr: float = 0.5, fixed_weights: bool = False, output_style: str = "tuple", **hparams):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Linear(IN_DIM, NUM_TASKS * CLASSES_PER_TASK)
        self.lr = 0.0 if fixed_weights else lr
        self.fixed_weights = fixed_weights
        self.output_style = output_style
        self.history: list[tuple[int, list[float]]] = []  # (epoch, per-task accuracy), computed independently
        self._counts: dict[int, list[int]] = {}

    def on_train_epoch_start(self) -> None:
        if self.fixed_weights and self.current_epoch % EPOCHS_PER_TASK == 0:
            generator = torch.Generator().manual_seed(1000 + self.current_epoch // EPOCHS_PER_TASK)
            with torch.no_grad():
                self.net.weight.copy_(torch.randn(self.net.weight.shape, generator=generator))
                self.net.bias.copy_(torch.randn(self.net.bias.shape, generator=generator))

    def training_step(self, batch, batch_idx):
        inputs, targets, _ = batch
        return F.cross_entropy(self.net(inputs), targets)

    def validation_step(self, batch, batch_idx):
        inputs, targets, task_ids = batch
        logits = self.net(inputs)
        hits = logits.argmax(1) == targets
        for task, hit in zip(task_ids.tolist(), hits.tolist(), strict=True):
            counts = self._counts.setdefault(task, [0, 0])
            counts[0] += int(hit)
            counts[1] += 1
        if self.output_style == "dict":
            return {"preds": logits.argmax(1), "targets": targets, "task_ids": task_ids}
        if self.output_style == "logits":
            return logits
        if self.output_style == "custom":
            return {"scores": logits, "y": targets, "t": task_ids}
        if self.output_style == "none":
            return None
        return logits, targets, task_ids

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            tasks = sorted(self._counts)
            self.history.append((self.current_epoch, [100.0 * self._counts[t][0] / self._counts[t][1] for t in tasks]))
        self._counts = {}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def make_trainer(root: str | Path, callbacks: list, max_epochs: int = NUM_TASKS * EPOCHS_PER_TASK, **kwargs) -> Trainer:
    options = dict(
        max_epochs=max_epochs,
        check_val_every_n_epoch=EPOCHS_PER_TASK,
        reload_dataloaders_every_n_epochs=1,
        default_root_dir=str(root),
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        enable_checkpointing=False,
        callbacks=callbacks,
    )
    options.update(kwargs)
    return Trainer(**options)


def assert_same_matrix(actual, expected) -> None:
    actual, expected = torch.as_tensor(actual, dtype=torch.float64), torch.as_tensor(expected, dtype=torch.float64)
    assert torch.equal(torch.isnan(actual), torch.isnan(expected))
    assert torch.equal(actual.nan_to_num(-1.0), expected.nan_to_num(-1.0))


# ---------------------------------------------------------------- tests
def test_fit_fills_lower_triangle_files_and_logs(tmp_path):
    torch.manual_seed(0)
    callback = ContinualEvaluation(num_tasks=NUM_TASKS, epochs_per_task=EPOCHS_PER_TASK, print_table=True)
    model = LinearClassifier()
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    trainer = make_trainer(tmp_path, [callback], logger=logger)
    trainer.fit(model, datamodule=ToyTasks())

    matrix = callback.matrix
    lower = torch.tril(torch.ones(NUM_TASKS, NUM_TASKS, dtype=torch.bool))
    assert torch.isfinite(matrix[lower]).all() and torch.isnan(matrix[~lower]).all()
    assert callback.filled_rows == [0, 1, 2]
    # the task of each row: validation after the last epoch of each task, rows equal the module's own count
    assert [epoch for epoch, _ in model.history] == [1, 3, 5]
    for t, (_, accuracies) in enumerate(model.history):
        assert len(accuracies) == t + 1
        assert matrix[t, : t + 1].tolist() == accuracies
    assert callback.last_counts == {"task": 2, "correct": callback.last_counts["correct"], "total": list(VAL_SIZES)}

    # files, in the logger's version directory
    out = Path(logger.log_dir)
    with open(out / "accuracy_matrix.csv") as file:
        rows = list(csv.reader(file))
    assert rows[0] == ["after_task", "task_0", "task_1", "task_2"]
    for t in range(NUM_TASKS):
        assert rows[t + 1][0] == str(t)
        assert [float(v) for v in rows[t + 1][1 : t + 2]] == matrix[t, : t + 1].tolist()
        assert all(v == "" for v in rows[t + 1][t + 2 :])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_tasks"] == NUM_TASKS
    assert metrics["accuracy_matrix"][0][1:] == [None, None]
    assert_same_matrix([[math.nan if v is None else v for v in row] for row in metrics["accuracy_matrix"]], matrix)
    final_row = matrix[2].tolist()
    assert metrics["final"]["task"] == 2
    assert metrics["final"]["avg_acc"] == sum(final_row) / 3
    expected_forgetting = ((max(matrix[0, 0], matrix[1, 0]) - matrix[2, 0]) + (matrix[1, 1] - matrix[2, 1])) / 2
    assert metrics["final"]["forgetting"] == expected_forgetting.item()
    expected_reference = ((matrix[0, 0] - matrix[2, 0]) + (matrix[1, 1] - matrix[2, 1])) / 3
    assert abs(metrics["final"]["ref_forgetting"] - expected_reference.item()) < 1e-12
    assert metrics["curves"]["avg_acc"] == callback.results
    assert callback.results[1] == (matrix[1, 0] + matrix[1, 1]).item() / 2
    assert callback.summary()["final"] == metrics["final"]
    assert (out / "accuracy_matrix.png").stat().st_size > 0

    # logged scalars and the TensorBoard image
    logged = trainer.callback_metrics  # Lightning stores logged floats as float32 tensors
    assert logged["cl/avg_acc"].item() == pytest.approx(metrics["final"]["avg_acc"])
    assert logged["cl/task_2_acc"].item() == pytest.approx(final_row[2])
    assert logged["cl/bwt"].item() == pytest.approx(metrics["final"]["bwt"])
    assert logged["cl/ref_forgetting"].item() == pytest.approx(metrics["final"]["ref_forgetting"])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out), size_guidance={"images": 0}).Reload()
    assert "cl/accuracy_matrix" in events.Tags()["images"]
    assert len(events.Images("cl/accuracy_matrix")) == NUM_TASKS
    assert "cl/forgetting" in events.Tags()["scalars"]

    # validate outside fit re-fills the current (last) task's row, with the same weights: same values
    results = trainer.validate(model, datamodule=ToyTasks(), verbose=False)
    assert_same_matrix(callback.matrix, matrix)
    assert results[0]["cl/avg_acc"] == pytest.approx(metrics["final"]["avg_acc"])


def test_state_dict_round_trip_and_resume(tmp_path):
    torch.manual_seed(0)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=EPOCHS_PER_TASK)
    callback = ContinualEvaluation(epochs_per_task=EPOCHS_PER_TASK, print_table=False, log_image=False)
    trainer = make_trainer(tmp_path, [callback, checkpoints], max_epochs=2 * EPOCHS_PER_TASK, enable_checkpointing=True)
    # num_tasks from the datamodule
    trainer.fit(LinearClassifier(), datamodule=ToyTasks(expose=True))
    assert callback.num_tasks == NUM_TASKS and callback.filled_rows == [0, 1]

    # torch.save / torch.load(weights_only=True) round trip, NaN included
    torch.save(callback.state_dict(), tmp_path / "state.pt")
    restored = ContinualEvaluation(num_tasks=NUM_TASKS, epochs_per_task=EPOCHS_PER_TASK)
    restored.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert_same_matrix(restored.matrix, callback.matrix)
    assert restored.filled_rows == [0, 1]

    # resume the run from the end of task 1 with a fresh callback: rows 0 and 1 come back, row 2 is added
    last = tmp_path / "ckpt" / "epoch=3-step=16.ckpt"
    assert last.exists(), sorted(os.listdir(tmp_path / "ckpt"))
    torch.load(last, weights_only=True)  # the callback state must not need unpickling of arbitrary objects
    resumed = ContinualEvaluation(num_tasks=NUM_TASKS, epochs_per_task=EPOCHS_PER_TASK, print_table=False)
    model = LinearClassifier()
    make_trainer(tmp_path, [resumed]).fit(model, datamodule=ToyTasks(), ckpt_path=str(last))
    assert resumed.filled_rows == [0, 1, 2]
    assert_same_matrix(resumed.matrix[:2], callback.matrix[:2])
    assert [epoch for epoch, _ in model.history] == [5]

    # validate a checkpoint on a fresh trainer: the row is the checkpoint's task (1), not epoch 0's task
    fresh = ContinualEvaluation(num_tasks=NUM_TASKS, epochs_per_task=EPOCHS_PER_TASK, print_table=False)
    ds = ConcatDataset(ToyTasks().val_sets[:2])
    trainer = make_trainer(tmp_path, [fresh])
    model = LinearClassifier(output_style="dict")
    trainer.validate(model, dataloaders=val_loader(ds, trainer), ckpt_path=str(last), verbose=False)
    assert fresh.filled_rows == [0, 1]  # row 0 from the checkpoint's state, row 1 re-evaluated
    assert_same_matrix(fresh.matrix, callback.matrix)


def test_defaults_from_hparams_output_styles_and_errors(tmp_path):
    callback = ContinualEvaluation(output_dir=str(tmp_path / "out"), print_table=False, log_image=False)
    model = LinearClassifier(output_style="logits", num_tasks=NUM_TASKS, epochs_per_task=EPOCHS_PER_TASK)
    make_trainer(tmp_path, [callback]).fit(model, datamodule=ToyTasks())
    assert callback.epochs_per_task == EPOCHS_PER_TASK and callback.filled_rows == [0, 1, 2]
    assert (tmp_path / "out" / "metrics.json").exists() and not (tmp_path / "out" / "accuracy_matrix.png").exists()
    for t, (_, accuracies) in enumerate(model.history):
        assert callback.matrix[t, : t + 1].tolist() == accuracies

    # custom dict keys, and an adapter
    keyed = ContinualEvaluation(
        NUM_TASKS, EPOCHS_PER_TASK, print_table=False, log_image=False, logits_key="scores", targets_key="y"
    )
    adapted = ContinualEvaluation(
        NUM_TASKS,
        EPOCHS_PER_TASK,
        output_dir=str(tmp_path / "adapted"),
        print_table=False,
        log_image=False,
        output_adapter=lambda outputs, batch: (outputs["scores"], outputs["y"], batch[2]),
        log_prefix="adapted/",
    )
    model = LinearClassifier(output_style="custom")
    make_trainer(tmp_path, [keyed, adapted]).fit(model, datamodule=ToyTasks())
    assert_same_matrix(keyed.matrix, adapted.matrix)
    assert keyed.state_key != adapted.state_key
    for t, (_, accuracies) in enumerate(model.history):
        assert keyed.matrix[t, : t + 1].tolist() == accuracies

    with pytest.raises(ValueError, match="needs `num_tasks`"):
        make_trainer(tmp_path, [ContinualEvaluation(print_table=False)]).fit(LinearClassifier(), datamodule=ToyTasks())
    with pytest.raises(TypeError, match="could not read the output of `validation_step`"):
        callback = ContinualEvaluation(NUM_TASKS, EPOCHS_PER_TASK, print_table=False, log_image=False)
        make_trainer(tmp_path, [callback]).fit(LinearClassifier(output_style="none"), datamodule=ToyTasks())


def test_task_counts_from_a_task_schedule_attributes_or_hparams():
    from types import SimpleNamespace

    from cdl_lightning.callbacks.protocols import HasTaskSchedule, resolve_task_counts
    from cdl_lightning.tasks import TaskSchedule

    scheduled = SimpleNamespace(task_schedule=TaskSchedule((2, 2, 2), epochs_per_task=4))
    assert isinstance(scheduled, HasTaskSchedule) and not isinstance(SimpleNamespace(), HasTaskSchedule)
    wanted = {"num_tasks": None, "epochs_per_task": None}
    assert resolve_task_counts(wanted, scheduled, None) == {"num_tasks": 3, "epochs_per_task": 4}
    # an argument wins; the data module before the module; attributes, then hparams
    assert resolve_task_counts({"num_tasks": 5, "epochs_per_task": None}, scheduled, None)["num_tasks"] == 5
    with_attributes = SimpleNamespace(num_tasks=7, epochs_per_task=1)
    assert resolve_task_counts(wanted, with_attributes, scheduled) == {"num_tasks": 7, "epochs_per_task": 1}
    module = SimpleNamespace(hparams={"num_tasks": 2, "epochs_per_task": 3})
    assert resolve_task_counts(wanted, None, module) == {"num_tasks": 2, "epochs_per_task": 3}
    with pytest.raises(ValueError, match="needs `epochs_per_task`"):
        resolve_task_counts(wanted, SimpleNamespace(num_tasks=2), None)


def test_accuracy_matrix_rows_summary_and_state():
    from cdl_lightning.callbacks._accuracy_matrix import AccuracyMatrix
    from cdl_lightning.metrics import MATRIX_METRICS

    matrix = AccuracyMatrix(3)
    row = matrix.fill_row(0, torch.tensor([9, 0, 0]), torch.tensor([10, 0, 4]))  # task 2's samples are ignored
    assert_same_matrix(row, [90.0, math.nan, math.nan])
    matrix.fill_row(1, torch.tensor([6, 7, 0]), torch.tensor([10, 10, 0]))
    assert matrix.filled_rows == [0, 1] and matrix.last_counts == {"task": 1, "correct": [6, 7, 0],
                                                                    "total": [10, 10, 0]}
    summary = matrix.summary(epochs_per_task=2)
    assert summary["final"] == {"task": 1, **{m.key: summary["curves"][m.key][1] for m in MATRIX_METRICS}}
    assert summary["final"]["avg_acc"] == pytest.approx(65.0) and summary["final"]["forgetting"] == pytest.approx(30.0)
    restored = AccuracyMatrix.from_state_dict(matrix.state_dict())
    assert_same_matrix(restored.values, matrix.values) and restored.filled == [True, True, False]
    with pytest.raises(ValueError, match="Malformed"):
        AccuracyMatrix.from_state_dict({"num_tasks": 2, "matrix": [[1.0]], "filled": [True, False]})
    with pytest.raises(IndexError, match="row 3 out of range"):
        matrix.fill_row(3, torch.zeros(3), torch.zeros(3))


def test_table_title_and_compare_show_every_registered_metric(tmp_path):
    from rich.console import Console
    from rich.markup import escape

    from cdl_lightning.callbacks._accuracy_report import heatmap_title, summary_table
    from cdl_lightning.compare import compare
    from cdl_lightning.metrics import MATRIX_METRICS, metric_curves

    values = [[90.0, math.nan], [80.0, 70.0]]
    curves = metric_curves(values)
    assert list(curves) == [m.key for m in MATRIX_METRICS]
    table = summary_table(torch.tensor(values).numpy(), curves)
    assert [c.header for c in table.columns][-len(MATRIX_METRICS):] == [m.column for m in MATRIX_METRICS]
    assert all(escape(m.formula) in str(table.caption) for m in MATRIX_METRICS)
    final = {m.key: curves[m.key][1] for m in MATRIX_METRICS}
    assert heatmap_title(1, final) == "after task 1: " + ", ".join(f"{m.column} {final[m.key]:.2f}"
                                                                    for m in MATRIX_METRICS)
    (tmp_path / "metrics.json").write_text(json.dumps({"accuracy_matrix": [[90.0, None], [80.0, 70.0]],
                                                       "final": final}))
    console = Console(record=True, width=160)
    compare([str(tmp_path)], ["run"], console=console)
    text = console.export_text()
    assert all(m.column in text for m in MATRIX_METRICS) and f"{final['forgetting']:.2f}" in text


@pytest.mark.slow  # two DDP processes (gloo) started in a subprocess
def test_ddp_matrix_equals_single_process(tmp_path):
    single = run_fixed_weights(tmp_path / "single", devices=1)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]),
    }
    process = subprocess.run(
        [sys.executable, __file__, str(tmp_path / "ddp"), "2"], env=env, capture_output=True, text=True, timeout=120
    )
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    ddp_matrix = [[math.nan if v is None else v for v in row] for row in metrics["accuracy_matrix"]]
    assert metrics["filled_rows"] == [0, 1, 2]
    assert metrics["last_evaluation"]["total"] == list(VAL_SIZES)  # every sample once: 101, not 102
    assert_same_matrix(ddp_matrix, single.matrix)
    assert metrics["final"] == json.loads((tmp_path / "single" / "metrics.json").read_text())["final"]


def run_fixed_weights(out_dir: str | Path, devices: int) -> ContinualEvaluation:
    callback = ContinualEvaluation(
        num_tasks=NUM_TASKS,
        epochs_per_task=EPOCHS_PER_TASK,
        output_dir=str(out_dir),
        print_table=False,
        log_image=False,
    )
    strategy = "ddp" if devices > 1 else "auto"
    trainer = make_trainer(out_dir, [callback], devices=devices, strategy=strategy, num_sanity_val_steps=0)
    trainer.fit(LinearClassifier(fixed_weights=True), datamodule=ToyTasks())
    return callback


if __name__ == "__main__":
    torch.set_num_threads(1)
    run_fixed_weights(sys.argv[1], devices=int(sys.argv[2]))
