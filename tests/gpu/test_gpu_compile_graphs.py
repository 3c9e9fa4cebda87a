"""``compile=True`` with ``cuda_graphs`` (opt-in, not bitwise): the compiled gradient-free passes (query, teacher,
evaluation) are captured into `GraphedFunction`'s CUDA graphs and replayed, nothing is compiled under capture (no
runner falls back to eager), the replays give what the compiled passes give without graphs, and the whole thing stays
within bf16 rounding of the eager run. The graphed training pass captures the ViT's plain forward (`PlainForward`),
or with ``compile_training_pass`` (experimental) its compiled call. A smaller evaluation batch runs padded into the
compiled batch size (`BatchPadding`), nothing compiled for it.

Tiny ViTs (a CODA teacher of width 64, a KDP student of width 32, 32 px) under bf16 autocast, trained by hand a few
steps. The measured deviation at the paper's widths comes from ``benchmarks/check_fast_paths.py --compile``.
"""

from __future__ import annotations

import pytest
import torch
from _gpu import CODA, GPU, STUDENT_VIT, TEACHER_VIT, counters, sgd_steps, teacher_checkpoint_file
from torch._dynamo.utils import counters as dynamo_counters

from cdl_lightning.models import Distiller, PromptLearner
from cdl_lightning.models.fast_paths import PlainForward
from cdl_lightning.nn import KDP

pytestmark = GPU

TASK_SIZES = [4, 4]
STEPS, BATCH = 4, 16


@pytest.fixture(scope="module")
def teacher_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A finished tiny CODA teacher run's checkpoint (random prompts, one snapshot per task)."""
    torch.manual_seed(0)
    teacher = PromptLearner(backbone=TEACHER_VIT, prompt=CODA, task_sizes=TASK_SIZES, epochs_per_task=1)
    return teacher_checkpoint_file(teacher, tmp_path_factory.mktemp("teacher"))


def student(checkpoint: str, compile_training_pass: bool = False, **flags: bool) -> Distiller:
    """A KDP student on CUDA at task 0, frozen weights in bf16 (what a bf16-mixed trainer's setup does), its
    ``configure_model`` run (with ``compile``: the ViTs' passes compiled, lazily)."""
    torch.manual_seed(0)
    model = Distiller(method=KDP(), teacher_checkpoint=checkpoint, backbone=STUDENT_VIT, prompt=CODA,
                      task_sizes=TASK_SIZES, epochs_per_task=1, **flags)
    model.fast_paths.compile_training_pass = compile_training_pass
    model.log = lambda *args, **kwargs: None  # no trainer
    model = model.cuda()
    model.open_task(0)
    model.cast_frozen_weights_(torch.bfloat16)
    model.configure_model()
    return model


def train(model: Distiller, batches: list) -> torch.Tensor:
    """``STEPS`` training steps (``training_step`` + backward + plain SGD) under bf16 autocast; the losses."""
    return sgd_steps(model, batches)


def gradient_free(model: Distiller, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """The query and the teacher's logits through the learner (graphed where ``cuda_graphs``), and the same passes
    called directly (never graphed), each under no_grad and bf16 autocast."""
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        query = model.query(images)
        teacher = model.teacher_forward(images, 0, query).logits
        direct_query = model.classifier.query(images)
        inputs = (images, direct_query) if model.share_query else (images,)
        direct_teacher = model._teacher_pass(*inputs, task=0, train=model.teacher_prompt_mode == "train",
                                             blocks=model.method.needs_teacher_blocks)[0]
    torch.cuda.synchronize()
    return {"query": query, "teacher": teacher, "direct query": direct_query, "direct teacher": direct_teacher}


def close_in_bf16(actual: torch.Tensor, expected: torch.Tensor, what: str, scale: float = 3e-2) -> None:
    """Within bf16 rounding carried through a few layers: ``scale`` of the largest |expected| (bf16 keeps 8 bits)."""
    a, e = actual.detach().float(), expected.detach().float()
    bound = scale * max(e.abs().max().item(), 1e-6)
    diff = (a - e).abs().max().item()
    assert torch.isfinite(a).all() and diff <= bound, f"{what}: max |diff| {diff:.3g} > {bound:.3g}"


@pytest.mark.parametrize("compile_training_pass", [False, True], ids=["plain_training_pass", "compiled_training_pass"])
def test_compiled_passes_replay_from_cuda_graphs_within_bf16_of_eager(teacher_checkpoint, compile_training_pass):
    torch._dynamo.reset()
    generator = torch.Generator(device="cuda").manual_seed(1)
    batches = [(torch.rand(BATCH, 3, 32, 32, device="cuda", generator=generator),
                torch.randint(0, TASK_SIZES[0], (BATCH,), device="cuda", generator=generator),
                torch.zeros(BATCH, dtype=torch.long, device="cuda")) for _ in range(STEPS)]
    compiled = student(teacher_checkpoint, compile_training_pass, compile=True)
    assert compiled.uses_cuda_graphs and compiled.classifier.backbone._compiled_call_impl is not None
    compiled_losses = train(compiled, batches)
    runners = compiled.graph_runners
    # every pass captured once on its second call and replayed from then on; no capture failed
    assert counters(compiled) == {"query": (1, STEPS - 1), "teacher": (1, STEPS - 1), "train": (1, STEPS - 1)}, \
        counters(compiled)
    assert {name: r.disabled_reason for name, r in runners.items()} == dict.fromkeys(runners)
    # the graphed training pass: the plain forward, or (compile_training_pass) the ViT's compiled call
    assert isinstance(runners["train"].vit, PlainForward) != compile_training_pass
    compiled_out = gradient_free(compiled, batches[0][0])
    assert counters(compiled)["query"] == (1, STEPS) and counters(compiled)["teacher"] == (1, STEPS)  # replayed
    # the replays give what the same compiled passes give without graphs
    close_in_bf16(compiled_out["query"], compiled_out["direct query"], "graphed vs ungraphed compiled query", 1e-2)
    close_in_bf16(compiled_out["teacher"], compiled_out["direct teacher"], "graphed vs ungraphed compiled teacher",
                  1e-2)
    # evaluation: captured on its second call, then replayed
    compiled.eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        logits = [compiled(batches[1][0], task=0) for _ in range(3)]
    assert counters(compiled)["logits"] == (1, 2) and runners["logits"].disabled_reason is None
    # a smaller batch (an evaluation's last): captured too, padded into the compiled batch size, nothing compiled
    compiled_graphs = dynamo_counters["stats"]["unique_graphs"]
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        remainders = [compiled(batches[1][0][:5], task=0) for _ in range(3)]
    assert counters(compiled)["logits"] == (2, 4) and runners["logits"].disabled_reason is None
    assert dynamo_counters["stats"]["unique_graphs"] == compiled_graphs
    # and all of it within bf16 rounding of the eager run (no compile, no graphs)
    eager = student(teacher_checkpoint, cuda_graphs=False)
    eager_losses = train(eager, batches)
    eager_out = gradient_free(eager, batches[0][0])
    eager.eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        eager_logits = eager(batches[1][0], task=0)
    close_in_bf16(compiled_losses, eager_losses, "training losses")
    close_in_bf16(compiled_out["query"], eager_out["query"], "query")
    close_in_bf16(compiled_out["teacher"], eager_out["teacher"], "teacher logits")
    for value in logits:
        close_in_bf16(value, eager_logits, "eval logits")
    for value in remainders:
        close_in_bf16(value, eager_logits[:5], "eval logits of a smaller batch")
    torch._dynamo.reset()
