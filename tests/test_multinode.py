"""Multi-node: `cdl fit` across 2 "nodes" x 1 process launched by torchrun on localhost (gloo, CPU), through the real
CLI; the run's evaluation equals a single-process evaluation of its final checkpoint."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from _cli_helpers import TINY_BACKBONE, as_args, cpu_run_options

from cdl_lightning.cli import cli_main

REPO = Path(__file__).resolve().parents[1]


def _options(save_dir: Path) -> dict[str, object]:
    return {
        **cpu_run_options(save_dir, "run"),
        "--trainer.enable_model_summary": "false",
        "--data.source.num_classes": 4,
        "--data.source.train_per_class": 8,
        "--data.source.test_per_class": 5,
        "--data.num_tasks": 2,
        "--data.batch_size": 4,
        "--data.image_size": 32,
        "--model": "cdl_lightning.models.PromptLearner",
        "--model.backbone": TINY_BACKBONE,
        "--model.prompt": "cdl_lightning.nn.prompts.CodaPrompt",
        "--model.prompt.pool_size": 8,
        "--model.prompt.layers": "[0]",
        "--evaluation.print_table": "false",
        "--evaluation.log_image": "false",
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two torchrun processes (about 12 s)
def test_two_nodes_through_torchrun_evaluate_like_one_process(tmp_path):
    fit_dir = tmp_path / "two_nodes"
    args = ["fit", *as_args({**_options(fit_dir), "--trainer.num_nodes": 2, "--trainer.devices": 1,
                             "--trainer.strategy": "ddp"})]
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
             "--node_rank", str(rank), "--master_addr", "127.0.0.1", "--master_port", str(port),
             "-m", "cdl_lightning.cli", *args],
            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    for node, output in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, output[-3000:]
    assert "MEMBER: 1/2" in outputs[0] and "MEMBER: 2/2" in outputs[1]  # two processes, one per "node"
    fit = json.loads((fit_dir / "run" / "metrics.json").read_text())
    assert fit["filled_rows"] == [0, 1]
    # the last evaluation's 20 test samples (2 tasks x 2 classes x 5) were split over the 2 processes and counted once
    assert fit["last_evaluation"]["task"] == 1 and fit["last_evaluation"]["total"] == [10, 10]
    checkpoint = fit_dir / "run" / "checkpoints" / "last.ckpt"
    one_dir = tmp_path / "one_process"
    cli_main(["validate", *as_args({**_options(one_dir), "--ckpt_path": checkpoint,
                                    "--evaluation.output_dir": one_dir / "eval"})])
    one = json.loads((one_dir / "eval" / "metrics.json").read_text())
    assert one["final"]["task"] == fit["final"]["task"] == 1
    assert one["accuracy_matrix"][1] == fit["accuracy_matrix"][1]
    assert one["last_evaluation"] == fit["last_evaluation"]
