"""Exact resume and exact evaluation on a GPU, with the fast paths on (bf16-mixed, cast frozen weights, CUDA graphs).

A run stopped in the middle of task 1 and resumed from its step checkpoint ends with bitwise the accuracy matrix and
trainable state of an uninterrupted run. That needs bitwise reproducible GPU training: two uninterrupted runs are
compared first, and if they differ the test is reported as an expected failure naming it (the resume is then only as
exact as the GPU). Independently of training, evaluating fixed weights is exact: ``trainer.validate`` of a checkpoint,
twice, gives bitwise the row the fit wrote.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from _gpu import CODA, GPU, TEACHER_VIT, assert_bitwise, evaluation, gpu_trainer, make_data, rng_state

from cdl_lightning.models import PromptLearner

pytestmark = GPU

NUM_TASKS, EPOCHS_PER_TASK, STEPS_PER_EPOCH = 2, 2, 8  # make_data(): 128 training images per task, batches of 16


def learner(data) -> PromptLearner:
    torch.manual_seed(0)  # the random-init frozen ViT is rebuilt identically from the seed (checkpoints omit it)
    return PromptLearner(backbone=TEACHER_VIT, prompt=CODA, **data.model_kwargs())


def fit(root: Path, ckpt_path: Path | None = None, **trainer_kwargs: object) -> SimpleNamespace:
    from lightning.pytorch import seed_everything
    from lightning.pytorch.callbacks import ModelCheckpoint

    seed_everything(0, verbose=False)
    data = make_data(NUM_TASKS, EPOCHS_PER_TASK)
    model, result = learner(data), evaluation()
    checkpoint = ModelCheckpoint(dirpath=root / "checkpoints", save_last=True, every_n_train_steps=1,
                                 enable_version_counter=False)
    trainer = gpu_trainer(root, data, callbacks=[result, rng_state(), checkpoint], **trainer_kwargs)
    trainer.fit(model, data, ckpt_path=ckpt_path)
    torch.cuda.synchronize()
    return SimpleNamespace(matrix=result.matrix, state=model.trainable_state(), step=trainer.global_step,
                           last=root / "checkpoints" / "last.ckpt")


def same_run(a: SimpleNamespace, b: SimpleNamespace) -> bool:
    return torch.equal(a.matrix.nan_to_num(-1), b.matrix.nan_to_num(-1)) and all(
        torch.equal(a.state[name], b.state[name]) for name in a.state)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    return fit(tmp_path_factory.mktemp("uninterrupted"))


def test_resume_mid_task_matches_the_uninterrupted_run(uninterrupted, tmp_path):
    again = fit(tmp_path / "again")
    if not same_run(again, uninterrupted):
        pytest.xfail("two uninterrupted bf16 GPU fits differ (nondeterministic kernels): a resume cannot be bitwise "
                     "here; test_validate_of_fixed_weights_is_exact covers exact evaluation")
    stop = (EPOCHS_PER_TASK + 1) * STEPS_PER_EPOCH + 3  # task 1's second epoch (epoch 3), after its third step
    part = fit(tmp_path / "part", max_steps=stop)
    assert part.step == stop
    state = torch.load(part.last, map_location="cpu", weights_only=False)
    assert state["global_step"] == stop and state["cdl"]["opened_task"] == 1
    resumed = fit(tmp_path / "part", ckpt_path=part.last)
    assert resumed.step == uninterrupted.step == NUM_TASKS * EPOCHS_PER_TASK * STEPS_PER_EPOCH
    assert not torch.isnan(uninterrupted.matrix[-1]).any()
    assert_bitwise(resumed.matrix, uninterrupted.matrix, "accuracy matrix after resume")
    for name, value in uninterrupted.state.items():
        assert_bitwise(resumed.state[name], value, f"trainable {name} after resume")


def test_validate_of_fixed_weights_is_exact(uninterrupted, tmp_path):
    """``trainer.validate`` of the final checkpoint on a freshly built model writes bitwise the fit's last row."""
    rows = []
    for _ in range(2):
        data = make_data(NUM_TASKS, EPOCHS_PER_TASK)
        model, result = learner(data), evaluation()
        gpu_trainer(tmp_path, data, callbacks=[result], enable_checkpointing=False).validate(
            model, data, ckpt_path=uninterrupted.last)
        rows.append(result.matrix[NUM_TASKS - 1])
    assert_bitwise(rows[0], uninterrupted.matrix[NUM_TASKS - 1], "validate row vs the fit's last row")
    assert_bitwise(rows[1], rows[0], "second validate")
