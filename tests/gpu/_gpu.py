"""Shared pieces of the GPU suite (``python -m pytest -m gpu tests/gpu``): markers, tiny models, a Trainer fit.

Run from the repository root: ``python -m pytest -m gpu tests/gpu -q`` (``make test-gpu``); every test skips without
CUDA, the DDP test also with fewer than 2 GPUs. Nothing here imports the CLI, so jsonargparse (absent on the project's
GPU machine unless installed from wheels) is not needed: the tests build models and trainers from Python. On that
machine: ``cd <copy of the repo> && PYTHONPATH=$PWD python3 -m pytest -m gpu tests/gpu -q -p no:cacheprovider``,
on the 2-GPU kind for the DDP test. To switch the expectation of the graph counters when evaluation and teacher graphs
stop being captured per task, flip `GRAPHS_SHARED_ACROSS_TASKS` below (one line).
"""

from __future__ import annotations

import functools
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from _cli_helpers import teacher_checkpoint_file  # noqa: F401  (one writer for the CPU and the GPU tests)

from cdl_lightning.callbacks import ContinualEvaluation, RNGStateCallback
from cdl_lightning.data import ContinualDataModule, SyntheticShapes
from cdl_lightning.models import PromptLearner
from cdl_lightning.nn import BackboneConfig, CodaPrompt

CUDA = torch.cuda.is_available()
GPU = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="the GPU suite needs CUDA (torch.cuda.is_available())")]
TWO_GPUS = pytest.mark.skipif(not CUDA or torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")

# Every task captures its own "logits" and "teacher" graphs (CODA-Prompt's pass uses 10 (t + 1) components at task t,
# so its shapes change with the task). Flip this to True if the graphs become independent of the task:
# `test_graph_counters_of_a_fit` then expects one capture per pass, and
# `test_captures_do_not_grow_with_the_number_of_tasks` stops being an expected failure.
GRAPHS_SHARED_ACROSS_TASKS = False

TINY = {"img_size": 32, "patch_size": 8, "depth": 4, "num_heads": 2}
TEACHER_VIT = BackboneConfig(name="vit_tiny_patch16_224", model_kwargs={**TINY, "embed_dim": 64})
STUDENT_VIT = BackboneConfig(name="vit_tiny_patch16_224", model_kwargs={**TINY, "embed_dim": 32})
CODA = functools.partial(CodaPrompt, pool_size=20, length=8, layers=(0, 1, 2))
B_TO_S_224 = (BackboneConfig(name="vit_base_patch16_224"), BackboneConfig(name="vit_small_patch16_224"),
              functools.partial(CodaPrompt, pool_size=20, length=8, layers=(0, 1, 2, 3, 4)), 224)
"""The paper's ViT-B -> ViT-S at 224 px as ``(teacher, student, prompt pool, image size)`` (`kdp_setup`)."""


def make_data(num_tasks: int = 2, epochs_per_task: int = 2, classes_per_task: int = 4,
              cuda_graphs: bool = True) -> ContinualDataModule:
    """Synthetic shapes, ``classes_per_task * 32`` training images per task (batches of 16: all full) and 8 test
    images per class (eval batches of 16: all full), so every pass sees one input shape. ``cuda_graphs``: the
    training batches' augmentation replayed from a CUDA graph (the data module's default)."""
    source = SyntheticShapes(num_classes=num_tasks * classes_per_task, train_per_class=32, test_per_class=8)
    return ContinualDataModule(source=source, num_tasks=num_tasks, epochs_per_task=epochs_per_task, batch_size=16,
                               eval_batch_size=16, image_size=32, cuda_graphs=cuda_graphs)


def gpu_trainer(root: Path, data: ContinualDataModule, precision: str = "bf16-mixed", callbacks: list | None = None,
                **kwargs: object):
    """A one-GPU trainer with the data module's task cadence, an evaluation callback first in ``callbacks``."""
    from lightning.pytorch import Trainer

    return Trainer(accelerator="gpu", devices=1, precision=precision, logger=False, enable_progress_bar=False,
                   enable_model_summary=False, default_root_dir=root, callbacks=callbacks or [],
                   **{**data.trainer_kwargs(), **kwargs})


def evaluation() -> ContinualEvaluation:
    return ContinualEvaluation(print_table=False, log_image=False)


def rng_state() -> RNGStateCallback:
    return RNGStateCallback()


def counters(model) -> dict[str, tuple[int, int]]:
    """``{pass name: (captures, replays)}`` of a model's CUDA-graph runners."""
    return {name: (runner.captures, runner.replays) for name, runner in model.graph_runners.items()}


def assert_bitwise(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Bitwise equality (NaNs in the same places), with the largest difference in the message."""
    a, e = actual.detach().float().cpu(), expected.detach().float().cpu()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    same_nan = torch.equal(torch.isnan(a), torch.isnan(e))
    equal = same_nan and torch.equal(a.nan_to_num(-1.0), e.nan_to_num(-1.0))
    diff = (a.nan_to_num(0.0) - e.nan_to_num(0.0)).abs().max().item() if a.numel() else 0.0
    assert equal, f"{what}: not bitwise equal (max |diff| {diff:.3g}, NaNs in the same places: {same_nan})"


def kdp_setup(name: str, teacher_vit: BackboneConfig, student_vit: BackboneConfig, prompt: functools.partial,
              size: int, task_sizes: list[int], directory: Path) -> SimpleNamespace:
    """A finished CODA teacher run's checkpoint (random prompts, one snapshot per task) in ``directory``, and the
    student's settings: ``name``, ``checkpoint``, ``student_vit``, ``prompt``, ``size``."""
    torch.manual_seed(0)
    teacher = PromptLearner(backbone=teacher_vit, prompt=prompt, task_sizes=task_sizes, epochs_per_task=1)
    path = teacher_checkpoint_file(teacher, directory)
    return SimpleNamespace(name=name, checkpoint=path, student_vit=student_vit, prompt=prompt, size=size)


def random_batches(steps: int, batch: int, size: int, classes: int, device: str = "cuda") -> list[tuple]:
    """``steps`` training batches ``(images, labels < classes, task 0)`` of ``size`` px, from generator seed 1."""
    generator = torch.Generator(device=device).manual_seed(1)
    return [(torch.rand(batch, 3, size, size, device=device, generator=generator),
             torch.randint(0, classes, (batch,), device=device, generator=generator),
             torch.zeros(batch, dtype=torch.long, device=device)) for _ in range(steps)]


def sgd_steps(model, batches: list, bf16: bool = True) -> torch.Tensor:
    """One ``training_step`` + backward + plain SGD step (lr 1e-3: no optimizer state to compare) per batch, under
    bf16 autocast if ``bf16``; the losses."""
    model.train()
    losses = []
    for i, batch in enumerate(batches):
        with torch.autocast(batch[0].device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model.training_step(batch, i)
        losses.append(loss.detach().float())
        loss.backward()
        for p in model.parameters():
            if p.grad is not None:
                p.data.add_(p.grad, alpha=-1e-3)
                p.grad = None
    return torch.stack(losses)
