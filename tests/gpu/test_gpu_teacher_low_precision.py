"""``teacher_low_precision=True`` (opt-in, not bitwise vs the autocast teacher) changes numbers only against the
autocast teacher, not between the fast paths and eager: with the flag on in both runs, the fast paths (frozen weights
stored in bf16, CUDA graphs for the gradient-free passes and the prompted training pass, the teacher on a second
stream) give bitwise the eager run's losses, learned parameters and eval logits under bf16 autocast, and the teacher
is stored in bf16 in both. Against the autocast teacher the run stays within bf16 rounding.

A KDP student taught by a CODA teacher, trained by hand a few steps: tiny ViTs (32 px, patch 8) and the paper's
ViT-B -> ViT-S at 224 px. The deviation at the paper's widths is printed by ``benchmarks/check_fast_paths.py
--teacher-low-precision``; the speed by ``benchmarks/throughput.py --teacher-low-precision``.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from _gpu import (
    B_TO_S_224,
    CODA,
    GPU,
    STUDENT_VIT,
    TEACHER_VIT,
    assert_bitwise,
    counters,
    kdp_setup,
    random_batches,
    sgd_steps,
)

from cdl_lightning.models import Distiller
from cdl_lightning.nn import KDP

pytestmark = GPU

TASK_SIZES = [4, 4]
STEPS, BATCH = 4, 16
SETUPS = {  # (teacher, student, prompt pool, image size)
    "tiny": (TEACHER_VIT, STUDENT_VIT, CODA, 32),
    "tiny-shared-query": (TEACHER_VIT, TEACHER_VIT, CODA, 32),  # one ViT: the query pass is the student's, left alone
    "224": B_TO_S_224,
}


@pytest.fixture(scope="module", params=sorted(SETUPS))
def setup(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A finished CODA teacher run's checkpoint (random prompts, one snapshot per task) and the student's settings."""
    return kdp_setup(request.param, *SETUPS[request.param], TASK_SIZES, tmp_path_factory.mktemp("teacher"))


def hand_steps(setup: SimpleNamespace, fast: bool, low: bool) -> SimpleNamespace:
    """``STEPS`` bf16 training steps (``training_step`` + backward + plain SGD) of the KDP student, then eval logits
    (twice: a graph is captured on the second call). ``fast`` = the default speed paths, else eager (no CUDA graphs)
    with fp32 frozen weights; ``low``: the teacher entirely in bf16 (as a bf16-mixed trainer's setup does with the
    flag)."""
    torch.manual_seed(0)
    model = Distiller(method=KDP(), teacher_checkpoint=setup.checkpoint, backbone=setup.student_vit,
                      prompt=setup.prompt, task_sizes=TASK_SIZES, epochs_per_task=1, cast_frozen_weights=fast,
                      cuda_graphs=fast, teacher_low_precision=low)
    model.log = lambda *args, **kwargs: None  # no trainer
    model = model.cuda()
    model.open_task(0)
    if fast:
        model.cast_frozen_weights_(torch.bfloat16)
    if low:
        model.teacher_low_precision_(torch.bfloat16)
    batches = random_batches(STEPS, BATCH, setup.size, TASK_SIZES[0])
    losses = sgd_steps(model, batches)
    model.eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        logits = [model(batches[0][0], task=0) for _ in range(2)][-1]
    torch.cuda.synchronize()
    own = [p for name, p in model.teacher.named_parameters() if not name.startswith("query_encoder.")]
    assert model.share_query == (setup.name == "tiny-shared-query")
    return SimpleNamespace(losses=losses, state=model.trainable_state(), logits=logits, counters=counters(model),
                           teacher_dtypes={p.dtype for p in own})


def test_fast_paths_with_a_low_precision_teacher_equal_eager_with_it(setup):
    eager = hand_steps(setup, fast=False, low=True)
    fast = hand_steps(setup, fast=True, low=True)
    assert eager.teacher_dtypes == fast.teacher_dtypes == {torch.bfloat16}
    expected = {"query": (1, STEPS - 1), "teacher": (1, STEPS - 1), "train": (1, STEPS - 1), "logits": (1, 1)}
    assert eager.counters == {} and fast.counters == expected, fast.counters
    assert_bitwise(fast.losses, eager.losses, f"{setup.name}: training losses")
    for name, value in eager.state.items():
        assert_bitwise(fast.state[name], value, f"{setup.name}: learned {name}")
    assert_bitwise(fast.logits, eager.logits, f"{setup.name}: eval logits")


def test_a_low_precision_teacher_stays_within_bf16_of_the_autocast_one(setup):
    mixed = hand_steps(setup, fast=True, low=False)
    low = hand_steps(setup, fast=True, low=True)
    assert mixed.teacher_dtypes != {torch.bfloat16} and low.teacher_dtypes == {torch.bfloat16}
    for what, a, e in (("training losses", low.losses, mixed.losses), ("eval logits", low.logits, mixed.logits)):
        a, e = a.float(), e.float()
        diff, bound = (a - e).abs().max().item(), 3e-2 * max(e.abs().max().item(), 1e-6)
        print(f"{setup.name}: {what} max |low - mixed| {diff:.3g} (bitwise equal: {torch.equal(a, e)})")
        assert torch.isfinite(a).all() and diff <= bound, f"{setup.name}: {what}: max |diff| {diff:.3g} > {bound:.3g}"
