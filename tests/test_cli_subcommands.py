"""What each `cdl` subcommand writes: fit owns the run's config.yaml; the others write their own files; a fresh fit
into a fixed-name run replaces its TensorBoard events; tables are not cut in logs."""

from __future__ import annotations

import io
import json
import sys

import numpy as np
import yaml
from _cli_helpers import TINY_BACKBONE, as_args, cpu_run_options
from PIL import Image
from rich.console import Console

from cdl_lightning.cli import _rich_width, main
from cdl_lightning.compare import compare


def fit_options(save_dir) -> list[str]:
    return as_args({
        **cpu_run_options(save_dir, "run"),
        "--trainer.limit_train_batches": 2,
        "--trainer.enable_model_summary": "false",
        "--data.source.num_classes": 4,
        "--data.source.train_per_class": 6,
        "--data.source.test_per_class": 3,
        "--data.num_tasks": 2,
        "--data.batch_size": 4,
        "--data.image_size": 32,
        "--data.num_workers": 0,
        "--model": "cdl_lightning.models.PromptLearner",
        "--model.backbone": TINY_BACKBONE,
        "--evaluation.print_table": "false",
        "--evaluation.log_image": "false",
    })


def test_config_yaml_is_written_by_fit_only_and_tensorboard_events_do_not_stack(tmp_path):
    run = tmp_path / "runs" / "run"
    main(["fit", *fit_options(tmp_path / "runs")])
    config, checkpoint = run / "config.yaml", run / "checkpoints" / "last.ckpt"
    written_by_fit = config.read_text()
    assert yaml.safe_load(written_by_fit)["model"]["class_path"] == "cdl_lightning.models.PromptLearner"
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        Image.fromarray(np.full((32, 32, 3), 40 * i, dtype=np.uint8)).save(images / f"{i}.png")
    # the README's flow: predict with the run's own config.yaml
    main(["predict", "--config", str(config), "--ckpt_path", str(checkpoint), "--data.predict_root", str(images)])
    assert config.read_text() == written_by_fit
    assert "predict_root" in (run / "config_predict.yaml").read_text()
    assert len((run / "predictions.csv").read_text().splitlines()) == 4
    main(["validate", "--config", str(config), "--ckpt_path", str(checkpoint)])
    assert config.read_text() == written_by_fit and (run / "config_validate.yaml").is_file()
    # fit again with the same config: works, and the fixed-name run has one set of TensorBoard events, not two
    main(["fit", "--config", str(config)])
    assert len(list(run.glob("events.out.tfevents.*"))) == 1
    assert json.loads((run / "metrics.json").read_text())["status"] == "complete"


def test_tables_are_not_cut_in_logs_and_keep_brackets(tmp_path, monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    monkeypatch.setattr(sys, "stdout", io.StringIO())  # not a terminal
    import rich

    with _rich_width():
        assert rich.get_console().width == 200
    run = tmp_path / "run"
    run.mkdir()
    matrix = [[90.0 + j if j <= t else None for j in range(12)] for t in range(12)]
    final = {"avg_acc": 95.5, "forgetting": 1.25, "ref_forgetting": 1.0, "bwt": -0.5}
    (run / "metrics.json").write_text(json.dumps({"accuracy_matrix": matrix, "final": final}))
    console = Console(file=io.StringIO(), width=200)
    compare([str(run)], console=console)
    out = console.file.getvalue()
    assert "accuracy matrix R[t, j] (%)" in out
    assert "task 11" in out and "101.00" in out  # twelve columns, none cut
