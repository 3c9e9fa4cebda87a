"""Failure drills through the real ``cdl fit`` (subprocesses, CPU, a tiny ViT on synthetic data).

- a NaN loss stops the run with a clear message and a non-zero exit; nothing diverged is saved;
- a divergence in task 2 leaves the last good checkpoint (end of the previous epoch, Adam's state packed as its nonzero
  rows) from which the run resumes to the uninterrupted run's exact accuracy matrix and weights, also when that
  checkpoint is rewritten in the older plain format, and ``metrics.json`` says ``diverged``;
- ``kill -9`` in the middle of task 2, epoch 2 of 3 loses at most that epoch (epoch checkpoints) or a step (step
  checkpoints), and the resumed run ends with the uninterrupted run's exact accuracy matrix.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _cli_helpers import TINY_BACKBONE, as_args, cpu_run_options

from cdl_lightning.cli import cli_main
from cdl_lightning.models import checkpoint_snapshots
from cdl_lightning.models.optimizer_state import unpack_optimizer_states

ROOT = Path(__file__).resolve().parents[1]
STEPS_PER_EPOCH, EPOCHS_PER_TASK = 3, 3
# task 2 (index 1) = epochs 3-5; its epoch 1 ends at global step 12, its epoch 2 (epoch 4) runs steps 13-15


def fit_args(save_dir: Path, *extra: str) -> list[str]:
    return ["fit", *as_args({
        **cpu_run_options(save_dir, "run"),
        "--trainer.limit_train_batches": STEPS_PER_EPOCH,
        "--trainer.enable_model_summary": "false",
        "--data.source.num_classes": 4,
        "--data.source.train_per_class": 8,
        "--data.source.test_per_class": 3,
        "--data.num_tasks": 2,
        "--data.epochs_per_task": EPOCHS_PER_TASK,
        "--data.batch_size": 4,
        "--data.image_size": 32,
        "--data.num_workers": 0,
        "--model": "cdl_lightning.models.PromptLearner",
        "--model.backbone": TINY_BACKBONE,
        "--model.lr": 0.05,  # learns enough in 18 steps for a matrix with distinct entries
        "--model.prompt": "cdl_lightning.nn.prompts.CodaPrompt",
        "--model.prompt.pool_size": 8,
        "--model.prompt.layers": "[0, 1]",
        "--evaluation.print_table": "false",
        "--evaluation.log_image": "false",
    }), *extra]


def cdl(args: list[str], **kwargs) -> subprocess.Popen:
    """``cdl ARGS`` in a subprocess, with ``tests/`` importable (for the drill callbacks)."""
    path = os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    code = "import sys, torch; torch.set_num_threads(1); from cdl_lightning.cli import main; main(sys.argv[1:])"
    return subprocess.Popen([sys.executable, "-c", code, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def metrics(save_dir: Path) -> dict:
    return json.loads((save_dir / "run" / "metrics.json").read_text())


def final_state(save_dir: Path) -> dict:
    """The trainable state and per-task snapshots of a run's last checkpoint."""
    state = torch.load(save_dir / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    return {"weights": state["state_dict"], "snapshots": checkpoint_snapshots(state["cdl"])}


def assert_same_run(save_dir: Path, uninterrupted: dict) -> None:
    """Same accuracy matrix and bitwise the same trainable weights and task snapshots as the uninterrupted run."""
    result = metrics(save_dir)
    assert result["status"] == "complete"
    assert result["accuracy_matrix"] == uninterrupted["accuracy_matrix"]
    state, reference = final_state(save_dir), uninterrupted["state"]
    assert state["weights"].keys() == reference["weights"].keys()
    assert all(torch.equal(state["weights"][k], reference["weights"][k]) for k in reference["weights"])
    assert len(state["snapshots"]) == len(reference["snapshots"]) == 2
    for mine, theirs in zip(state["snapshots"], reference["snapshots"]):
        assert all(torch.equal(mine[k], theirs[k]) for k in theirs)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    save_dir = tmp_path_factory.mktemp("full")
    cli_main(fit_args(save_dir))
    result = metrics(save_dir)
    assert result["status"] == "complete" and result["filled_rows"] == [0, 1]
    matrix = result["accuracy_matrix"]
    assert len({matrix[0][0], matrix[1][0], matrix[1][1]}) > 1  # a matrix that can tell runs apart
    return {**result, "state": final_state(save_dir)}


def test_nan_loss_stops_the_run(tmp_path):
    process = cdl(fit_args(tmp_path, "--model.init_args.lr", "1e30"))
    out, err = process.communicate(timeout=240)
    assert process.returncode == 1, err[-2000:]
    assert "Traceback" not in err
    assert "training diverged at task 0, epoch 1 of 3" in err and "non-finite task loss" in err
    assert "No checkpoint was written before it" in err
    assert not (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()
    assert not (tmp_path / "run" / "metrics.json").exists()  # no task finished: nothing that looks like a result


@pytest.mark.parametrize("background", [False, True], ids=["in_place", "background"])
def test_divergence_keeps_the_last_good_checkpoint_and_resumes_exactly(tmp_path, uninterrupted, background):
    poison_step = 13  # before the second batch of task 2's epoch 2
    args = fit_args(tmp_path, "--trainer.callbacks+=_drill_helpers.PoisonAt", f"--trainer.callbacks.step={poison_step}",
                    "--checkpoint.background", str(background).lower())
    process = cdl(args)
    out, err = process.communicate(timeout=240)
    assert process.returncode == 1, err[-2000:]
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert "training diverged at task 1, epoch 2 of 3" in err and "Traceback" not in err
    assert f"resume with `--ckpt_path {last}`" in err
    # the last good state: the end of task 2's first epoch (epoch 3), every trainable tensor finite
    state = torch.load(last, weights_only=False)
    assert state["epoch"] == 3 and state["global_step"] == 12
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values())
    # mid-task: Adam's moments of task 2 matter for the rest of it, and are saved as their nonzero rows
    assert state["cdl"]["optimizer_state_rows"] is True
    adam = state["optimizer_states"][0]["state"]
    assert any(isinstance(value, dict) for per_param in adam.values() for value in per_param.values())
    diverged = metrics(tmp_path)
    assert diverged["status"] == "diverged" and diverged["filled_rows"] == [0]
    if not background:
        # a checkpoint written before Adam's state was packed (plain `optimizer_states`, no mark) resumes as exactly
        old = tmp_path / "old_format"
        shutil.copytree(tmp_path / "run", old / "run")
        state["optimizer_states"] = unpack_optimizer_states(state["optimizer_states"])
        del state["cdl"]["optimizer_state_rows"]
        torch.save(state, old / "run" / "checkpoints" / "last.ckpt")
        cli_main(fit_args(old, "--ckpt_path", str(old / "run" / "checkpoints" / "last.ckpt")))
        assert_same_run(old, uninterrupted)
    cli_main(fit_args(tmp_path, "--ckpt_path", str(last)))
    assert_same_run(tmp_path, uninterrupted)


@pytest.mark.slow  # kill -9 and resume of cdl fit subprocesses (about 18 s)
@pytest.mark.parametrize("every", ["epoch", "step"])
def test_kill_9_mid_task_loses_at_most_that_epoch(tmp_path, uninterrupted, every):
    # stall at the end of the second batch of epoch 4 (task 2, epoch 2 of 3; global step 14), then SIGKILL
    stall_step, marker = 14, tmp_path / "stalled"
    cadence = [] if every == "epoch" else ["--checkpoint.every_n_train_steps", "1"]
    args = fit_args(tmp_path, *cadence, "--trainer.callbacks+=_drill_helpers.StallAt",
                    f"--trainer.callbacks.step={stall_step}", f"--trainer.callbacks.marker={marker}")
    process = cdl(args)
    deadline = time.monotonic() + 240
    while not marker.exists():
        assert process.poll() is None, process.communicate()[1][-2000:]
        assert time.monotonic() < deadline, "the run never reached the stall point"
        time.sleep(0.2)
    assert marker.read_text() == "4"
    os.kill(process.pid, signal.SIGKILL)
    process.communicate()
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert last.is_file() and not last.is_symlink()
    state = torch.load(last, weights_only=False)
    # epoch checkpoints: the end of epoch 3 (step 12); every step: step 13 (the stall came before step 14's save)
    assert (state["global_step"], state["epoch"]) == ((12, 3) if every == "epoch" else (13, 4))
    assert metrics(tmp_path)["status"] == "partial"
    cli_main(fit_args(tmp_path, *cadence, "--ckpt_path", str(last)))
    assert_same_run(tmp_path, uninterrupted)


def test_divergence_check_reads_its_flags_every_n_steps(tmp_path):
    """In any Lightning project: the loss goes NaN at step 3; with checks every 2 steps the run stops at global step 4
    naming the loss term, its first non-finite step and the non-finite parameters."""
    from lightning.pytorch import LightningModule, Trainer

    from cdl_lightning.callbacks import DivergenceCheck, DivergenceError

    class Tiny(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            loss = self.layer(batch[0]).pow(2).mean()
            if batch_idx == 3:
                loss = loss * float("nan")
            self.loss_terms = {"squared output": loss.detach()}
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def train_dataloader(self):
            data = torch.utils.data.TensorDataset(torch.ones(16, 2))
            return torch.utils.data.DataLoader(data, batch_size=2)

    trainer = Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                      callbacks=[DivergenceCheck(check_every_n_steps=2)])
    with pytest.raises(DivergenceError) as error_info:
        trainer.fit(Tiny())
    message = str(error_info.value)
    assert "global step 4 (a periodic check)" in message
    assert "non-finite squared output first at step 3" in message
    assert "non-finite trainable parameters (layer.weight, layer.bias)" in message
    assert trainer.global_step == 4


def test_background_checkpoints_hold_the_same_states_and_a_failed_write_fails_the_run(tmp_path, uninterrupted,
                                                                                      monkeypatch):
    """``checkpoint.background``: the files are written by a thread while training goes on, yet every one holds the
    state of its own moment (the resumed-after-divergence drill above checks a mid-run one; here the last one), and a
    write that fails stops the run with an error instead of leaving it without checkpoints."""
    cli_main(fit_args(tmp_path / "ok", "--checkpoint.background", "true"))
    assert_same_run(tmp_path / "ok", uninterrupted)
    from cdl_lightning.callbacks.checkpoint import RunCheckpoint

    assert RunCheckpoint().background is False  # in place by default: a checkpoint is on disk before training goes on
    with pytest.raises(ValueError, match="background=true with save_top_k=2 is not supported"):
        RunCheckpoint(save_top_k=2, monitor="cl/acc", background=True)

    from lightning.pytorch.plugins.io import AsyncCheckpointIO, TorchCheckpointIO

    writers = []

    def failing_save(self, checkpoint, path, storage_options=None):
        writers.append(isinstance(self, TorchCheckpointIO))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(TorchCheckpointIO, "save_checkpoint", failing_save)
    wrapped = []
    original = AsyncCheckpointIO.save_checkpoint
    monkeypatch.setattr(AsyncCheckpointIO, "save_checkpoint",
                        lambda self, *a, **k: wrapped.append(1) or original(self, *a, **k))
    with pytest.raises((OSError, SystemExit)) as failure:
        cli_main(fit_args(tmp_path / "full_disk", "--checkpoint.background", "true"))
    assert writers and wrapped  # the write went through the background wrapper and failed there
    if isinstance(failure.value, SystemExit):
        assert failure.value.code not in (0, None)
    assert not (tmp_path / "full_disk" / "run" / "checkpoints" / "last.ckpt").exists()


def test_epoch_end_saving_cannot_be_switched_off_silently():
    from cdl_lightning.callbacks.checkpoint import RunCheckpoint

    with pytest.raises(ValueError, match="save_on_train_epoch_end=false is not supported"):
        RunCheckpoint(save_on_train_epoch_end=False)
    assert RunCheckpoint(save_on_train_epoch_end=True).epoch_interval == 1  # the behaviour it always has: accepted


def test_divergence_flags_accumulate_on_the_device_for_scalar_and_mixed_terms():
    """The per-step accumulation (no sync): scalar terms of one dtype take the stacked path, others (a bf16 term, a
    tensor term) the per-term path; the first non-finite step is kept until the flags are read."""
    from types import SimpleNamespace

    from cdl_lightning.callbacks import DivergenceCheck

    for terms_at in (
        lambda bad: {"a": torch.tensor(float("nan") if bad else 1.0), "b": torch.tensor(2.0)},
        lambda bad: {"a": torch.tensor(float("inf") if bad else 1.0, dtype=torch.bfloat16), "b": torch.tensor(2.0)},
        lambda bad: {"a": torch.tensor([1.0, float("nan") if bad else 3.0]), "b": torch.tensor(2.0)},
    ):
        check = DivergenceCheck(check_every_n_steps=0)
        module = SimpleNamespace(loss_terms=None)
        for step in range(1, 6):
            module.loss_terms = terms_at(step in (3, 4))
            check.on_train_batch_end(SimpleNamespace(global_step=step), module, None, None, step - 1)
        assert check._bad.tolist() == [True, False]
        assert int(check._first_bad_step) == 2  # the third step (global step 3 after it, so step index 2)


def test_background_checkpoints_only_during_fit_and_a_failed_fit_leaves_no_stale_error(tmp_path, monkeypatch):
    """The background writer is `fit`'s only: afterwards `trainer.save_checkpoint` writes in place again (the file
    exists when it returns), and a fit whose write failed does not make the next fit on that trainer fail with the
    old error."""
    import lightning.pytorch as pl
    from lightning.pytorch.demos.boring_classes import BoringModel
    from lightning.pytorch.plugins.io import AsyncCheckpointIO, TorchCheckpointIO

    from cdl_lightning.callbacks.checkpoint import RunCheckpoint

    seen = []

    class Probe(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            seen.append(type(trainer.strategy.checkpoint_io).__name__)

    callback = RunCheckpoint(dirpath=str(tmp_path / "ckpt"), background=True)
    trainer = pl.Trainer(max_epochs=2, limit_train_batches=2, limit_val_batches=0, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[callback, Probe()],
                         default_root_dir=tmp_path)
    real_save = TorchCheckpointIO.save_checkpoint
    monkeypatch.setattr(TorchCheckpointIO, "save_checkpoint",
                        lambda *a, **k: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(OSError, match="No space left"):
        trainer.fit(BoringModel())
    assert isinstance(trainer.strategy.checkpoint_io, AsyncCheckpointIO)  # an exception skips the teardown hooks
    monkeypatch.setattr(TorchCheckpointIO, "save_checkpoint", real_save)
    trainer.fit_loop.max_epochs = 4
    trainer.fit(BoringModel())  # the same trainer: a fresh writer, not the failed one's error
    assert seen[-1] == "AsyncCheckpointIO" and (tmp_path / "ckpt" / "last.ckpt").is_file()
    assert type(trainer.strategy.checkpoint_io) is TorchCheckpointIO
    trainer.save_checkpoint(tmp_path / "after.ckpt")
    assert (tmp_path / "after.ckpt").is_file()  # written in place: complete when save_checkpoint returns
