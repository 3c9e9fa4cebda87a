"""``teacher_low_precision`` (opt-in, not bitwise): the frozen teacher run entirely in bf16 outside autocast
(`PromptedViT.low_precision_`, `Distiller.teacher_low_precision_`): every teacher tensor in bf16, its passes the same
inside and outside autocast and within bf16 rounding of the autocast teacher, snapshots loaded into it rounded
once, the student untouched, reversible, and through ``cdl fit`` (applied in ``setup`` under ``bf16-mixed``; a
warning and the plain teacher under fp32). Its speed and its deviation on a GPU: ``benchmarks/throughput.py`` /
``check_fast_paths.py --teacher-low-precision``."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from _cli_helpers import TINY_BACKBONE, as_args, teacher_checkpoint_file, two_task_run_options

from cdl_lightning.cli import cli_main
from cdl_lightning.models import Distiller, PromptLearner
from cdl_lightning.nn import KDP, BackboneConfig, CodaPrompt

TINY = json.loads(TINY_BACKBONE)


def images(batch: int = 4) -> torch.Tensor:
    return torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def coda(embed_dim: int, key_dim: int, num_tasks: int) -> CodaPrompt:
    return CodaPrompt(embed_dim, key_dim, num_tasks, pool_size=8, layers=(0, 1))


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def write_teacher(directory: Path, task_sizes: list[int]) -> str:
    """A finished teacher run's checkpoint (random prompts, one snapshot per task)."""
    torch.manual_seed(1)
    return teacher_checkpoint_file(PromptLearner(backbone=BackboneConfig(**TINY), prompt=coda, task_sizes=task_sizes),
                                   directory)


def test_a_low_precision_vit_runs_in_bf16_inside_and_outside_autocast():
    torch.manual_seed(0)
    vit = BackboneConfig(**TINY).build().requires_grad_(False).eval()
    x = images()
    vit.cast_matmul_weights_(torch.bfloat16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        reference, reference_query = vit(x).tokens, vit.query(x)
    assert reference.dtype == torch.float32  # autocast's residual stream: fp32 after the final LayerNorm
    vit.low_precision_(torch.bfloat16)
    assert {p.dtype for p in vit.parameters()} == {torch.bfloat16}
    assert vit.mean.dtype == vit.std.dtype == torch.float32  # the normalisation runs in the images' dtype, then rounds
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            inside, query = vit(x).tokens, vit.query(x)
        outside = vit(x).tokens
    assert inside.dtype == query.dtype == torch.bfloat16
    assert torch.equal(inside, outside)  # autocast is off in its passes whatever the caller does
    assert 0 < relative(inside, reference) < 0.03 and 0 < relative(query, reference_query) < 0.03
    with pytest.raises(RuntimeError, match=r"low_precision_\(None\) before storing its matmul weights"):
        vit.cast_matmul_weights_(torch.float32)
    vit.low_precision_(None)  # fp32 storage again, the matmul weights in the dtype they had before (bf16 here)
    assert vit.low_precision_dtype is None and vit.matmul_dtype == torch.bfloat16
    assert vit.vit.blocks[0].norm1.weight.dtype == torch.float32 and vit.vit.blocks[0].attn.qkv.weight.dtype == \
        torch.bfloat16
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert vit(x).tokens.dtype == torch.float32
    fresh = BackboneConfig(**TINY).build().requires_grad_(False)  # matmul weights never cast: fp32 again after
    fresh.low_precision_(torch.bfloat16)
    fresh.low_precision_(None)
    assert fresh.matmul_dtype == torch.float32 and {p.dtype for p in fresh.parameters()} == {torch.float32}
    vit.requires_grad_(True)
    with pytest.raises(RuntimeError, match="for frozen ViTs"):
        vit.low_precision_(torch.bfloat16)


def test_the_distiller_runs_its_teacher_in_bf16_and_can_go_back(tmp_path):
    teacher = write_teacher(tmp_path, [2, 2])
    student = BackboneConfig(**{**TINY, "model_kwargs": {**TINY["model_kwargs"], "embed_dim": 16}})
    torch.manual_seed(0)
    model = Distiller(method=KDP(), teacher_checkpoint=teacher, backbone=student, prompt=coda, task_sizes=[2, 2],
                      teacher_low_precision=True)
    assert model.hparams["teacher_low_precision"] is True and model.teacher_dtype is None  # applied by setup / by hand
    model.open_task(1)
    model.cast_frozen_weights_(torch.bfloat16)  # as a bf16-mixed trainer's setup does first
    x = images()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        reference = model.teacher_forward(x, 1, model.query(x))
    exact = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in model.state_dict().items()}
    model.teacher_low_precision_(torch.bfloat16)
    assert model.teacher_dtype == torch.bfloat16
    assert {p.dtype for p in model.teacher.parameters()} == {torch.bfloat16}
    assert all(torch.equal(v, student_before[k]) and v.dtype == student_before[k].dtype
               for k, v in model.state_dict().items())  # the student (and so its checkpoints) untouched
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        low = model.teacher_forward(x, 1, model.query(x))
    assert low.logits.dtype == low.features.dtype == torch.bfloat16  # (the losses compute in fp32)
    assert 0 < relative(low.logits, reference.logits) < 0.05
    # a task switch loads the next snapshot into the bf16 teacher: its exact values, rounded once
    model.load_teacher_task(0)
    snapshot = model.teacher_run.snapshot(0)
    for name in ("prompt.components", "prompt.keys", "head.weight"):
        value = model.teacher.state_dict()[name]
        assert value.dtype == torch.bfloat16 and torch.equal(value, snapshot[name].to(torch.bfloat16))
    model.load_teacher_task(1)
    # storing the frozen weights in another dtype (a Python loop's `cast_frozen_weights_`) keeps the teacher in bf16
    model.cast_frozen_weights_(torch.float32)
    assert model.classifier.backbone.matmul_dtype == torch.float32 and model.teacher_dtype == torch.bfloat16
    assert {p.dtype for p in model.teacher.parameters()} == {torch.bfloat16}
    model.cast_frozen_weights_(torch.bfloat16)
    # the training step runs on it: a finite loss and gradients for the student only
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model.training_step((x, torch.tensor([2, 3, 2, 3]), torch.ones(4, dtype=torch.long)), 0)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is None for p in model.teacher.parameters())
    # back to fp32: the current snapshot's prompts and head exactly; the ViT's frozen weights as rounded
    model.teacher_low_precision_(None)
    state = model.teacher.state_dict()
    assert model.teacher_dtype is None and state["prompt.components"].dtype == torch.float32
    assert all(torch.equal(state[k], exact[k]) for k in exact if k.startswith(("prompt.", "head.")))
    assert state["backbone.vit.blocks.0.norm1.weight"].dtype == torch.float32


def fit_options(tmp_path: Path, precision: str) -> dict[str, object]:
    return {
        **two_task_run_options(tmp_path, f"run-{precision}"),
        "--trainer.precision": precision,
        "--trainer.enable_model_summary": "false",
        "--model": "cdl_lightning.models.Distiller",
        "--model.backbone": TINY_BACKBONE,
        "--model.prompt": "cdl_lightning.nn.prompts.CodaPrompt",
        "--model.prompt.pool_size": 8,
        "--model.prompt.layers": "[0, 1]",
        "--model.method": "cdl_lightning.nn.KDP",
        "--model.teacher_checkpoint": write_teacher(tmp_path, [3, 3]),
        "--model.teacher_low_precision": "true",
        "--evaluation.log_image": "false",
    }


def test_cdl_fit_applies_it_under_bf16_mixed_and_warns_under_fp32(tmp_path):
    fit = cli_main(["fit", *as_args(fit_options(tmp_path, "bf16-mixed"))])
    model = fit.model
    # teacher and student have the same ViT here, so the query pass is shared: the student's, left alone
    assert model.share_query and model.teacher.query_encoder is model.classifier.backbone
    own = [p for name, p in model.teacher.named_parameters() if not name.startswith("query_encoder.")]
    assert model.teacher_dtype == torch.bfloat16 and {p.dtype for p in own} == {torch.bfloat16}
    assert model.classifier.backbone.vit.blocks[0].norm1.weight.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)  # the student's
    run = tmp_path / "run-bf16-mixed"
    matrix = json.loads((run / "metrics.json").read_text())["accuracy_matrix"]
    assert len(matrix) == 2 and all(v is not None for v in matrix[-1])
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["hyper_parameters"]["teacher_low_precision"] is True
    assert not any(k.startswith("teacher.") for k in checkpoint["state_dict"])  # the teacher is never saved
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit = cli_main(["fit", *as_args(fit_options(tmp_path, "32-true"))])
    assert any("teacher_low_precision applies under precision 'bf16-mixed' only: under '32-true'" in str(w.message)
               for w in caught)
    assert fit.model.teacher_dtype is None
    assert {p.dtype for p in fit.model.teacher.backbone.parameters()} == {torch.float32}


def test_benchmark_flags_run_on_cpu(monkeypatch, capsys):
    """``throughput.py --teacher-low-precision`` and ``check_fast_paths.py --teacher-low-precision`` (tiny ViTs, CPU):
    the bf16 case runs the teacher in bf16 and the fp32 case after it in fp32 again; the check prints the deviation
    of the teacher's logits (the student's query pass is untouched: bitwise) without asserting on it."""
    import importlib

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    throughput, check = importlib.import_module("throughput"), importlib.import_module("check_fast_paths")
    seen: list[torch.dtype | None] = []
    train_step = throughput.train_step

    def recording_train_step(model, batch, precision, s):
        step = train_step(model, batch, precision, s)  # (sets the case's precision up)
        seen.append(model.teacher_dtype)
        return step

    monkeypatch.setattr(throughput, "train_step", recording_train_step)
    assert throughput.main(["--tiny", "--teacher-low-precision", "--cases", "train-distill", "--pairs", "b-s",
                            "--precision", "bf16", "fp32"]) == 0
    assert seen == [torch.bfloat16, None]
    assert '"teacher_low_precision": true' in capsys.readouterr().out
    assert check.main(["--tiny", "--teacher-low-precision", "--steps", "1"]) == 0
    out = capsys.readouterr().out
    assert "the teacher in bf16 outside autocast" in out and "nothing is asserted on them" in out
    teacher = next(line for line in out.splitlines() if line.strip().startswith("teacher logits"))
    query = next(line for line in out.splitlines() if line.strip().startswith("query (student's)"))
    assert "bitwise equal: False" in teacher and "bitwise equal: True" in query
