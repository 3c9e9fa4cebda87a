"""`cdl fit` on 2 GPUs through the console script's early launch (`cdl_lightning.launch`): the two ranks start
together (within a quarter of one rank's startup), the run exits 0, and with lr 0 (weights stay at their seeded
start) its accuracy matrix equals a 1-GPU run's. Needs jsonargparse (the GPU machine gets it from wheels:
`benchmarks/gpu_checks.sh`); skipped without it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _gpu import GPU, TWO_GPUS

pytest.importorskip("jsonargparse", reason="the CLI needs jsonargparse (install it from wheels on the GPU machine)")

pytestmark = [*GPU, TWO_GPUS]

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))
from _cli_helpers import small_coda_fit_args  # noqa: E402

NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
GPU_RUN = ("--trainer.accelerator", "gpu", "--model.lr", "0.0")


def _cdl(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key not in ("LOCAL_RANK", "RANK", "WORLD_SIZE")}
    env.update({"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
                "CDL_STARTUP_LOG": str(cwd / "startup.log"), **NO_MULTICAST})
    return subprocess.run([sys.executable, "-m", "cdl_lightning.launch", *args], cwd=cwd, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=540)


def test_two_gpu_cdl_fit_starts_its_ranks_together_and_evaluates_like_one_gpu(tmp_path):
    runs = {}
    for name, extra in (("two", ("--trainer.devices", "2", "--trainer.strategy", "ddp")), ("one", ())):
        folder = tmp_path / name
        folder.mkdir()
        done = _cdl(small_coda_fit_args(folder, *GPU_RUN, *extra), folder)
        assert done.returncode == 0, done.stdout[-4000:]
        runs[name] = json.loads((folder / "run" / "metrics.json").read_text())
    marks = {}
    for line in (tmp_path / "two" / "startup.log").read_text().splitlines():
        event, rank, _, when = line.split()
        marks[(event, int(rank))] = float(when)
    startup = marks[("fit", 0)] - marks[("main", 0)]
    assert abs(marks[("main", 1)] - marks[("main", 0)]) < 0.25 * startup, marks
    two, one = runs["two"], runs["one"]
    assert two["status"] == one["status"] == "complete"
    assert two["accuracy_matrix"] == one["accuracy_matrix"] and two["last_evaluation"] == one["last_evaluation"]
