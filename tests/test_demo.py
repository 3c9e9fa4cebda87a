"""The README's main command, shortened: pretrain the demo ViTs, fit teacher, KDP student and plain student through
the real CLI with the demo configs, and compare them side by side."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from rich.console import Console

from cdl_lightning.cli import expand_config_args, main
from cdl_lightning.compare import compare

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SHORT = ["--data.epochs_per_task", "1", "--trainer.limit_train_batches", "3", "--trainer.enable_progress_bar", "false",
         "--evaluation.print_table", "false"]


@pytest.mark.slow  # pretrains two ViTs and runs three CLI fits: minutes on 2 cores
def test_demo_pipeline(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for side, width in (("teacher", 96), ("student", 48)):
        kwargs = f'{{"img_size": 32, "patch_size": 8, "embed_dim": {width}, "depth": 4, "num_heads": 3}}'
        main(["pretrain", "--out", f"runs/demo/backbones/{side}.pth", "--classes", "20", "40", "--epochs", "1",
              "--synthetic-classes", "40", "--model-kwargs", kwargs])
        weights = torch.load(f"runs/demo/backbones/{side}.pth", weights_only=True)
        assert weights["cls_token"].shape[-1] == width and not any(k.startswith("head") for k in weights)
    for config in ("demo.yaml", "demo/student_kdp.yaml", "demo/student_none.yaml"):
        main(expand_config_args(["fit", "--config", str(CONFIGS / config)]) + SHORT)
    runs = [tmp_path / "runs" / "demo" / name for name in ("teacher", "student_kdp", "student_none")]
    console = Console(record=True, width=120)
    results = compare([str(r) for r in runs], ["teacher", "KDP student", "plain student"], console=console)
    text = console.export_text()
    assert "KDP student" in text and "final average accuracy" in text
    assert all(len(r["accuracy_matrix"]) == 5 and r["filled_rows"] == [0, 1, 2, 3, 4] for r in results)
    # `cdl validate --ckpt_path` rebuilds each model (prompt pool, KD prompts) from its checkpoint and reproduces the
    # last row of the fit's accuracy matrix exactly
    for config, run, result in zip(("demo.yaml", "demo/student_kdp.yaml", "demo/student_none.yaml"), runs, results):
        out = tmp_path / f"validate_{run.name}"
        main(expand_config_args(["validate", "--config", str(CONFIGS / config)]) + SHORT[:2] + [
            "--ckpt_path", str(run / "checkpoints" / "last.ckpt"), "--trainer.logger", "false",
            "--evaluation.output_dir", str(out), "--evaluation.print_table", "false"])
        validated = json.loads((out / "metrics.json").read_text())
        assert validated["accuracy_matrix"][4] == result["accuracy_matrix"][4], run.name
    # the students' backbone is the pretrained file, not a random initialisation
    student = torch.load(runs[1] / "checkpoints" / "last.ckpt", weights_only=True)
    assert student["hyper_parameters"]["backbone"]["checkpoint_path"] == "runs/demo/backbones/student.pth"
