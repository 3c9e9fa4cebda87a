"""Exact evaluation under DDP on 2 GPUs: the same weights evaluated by 1 process and by 2 (DDP, unequal shares of an
odd-sized test set) give bitwise the same accuracy matrix row, which is also the row the 1-GPU fit wrote.

Runs ``_ddp_eval.py`` in subprocesses (Lightning's DDP re-launches the running script, which must not be pytest).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from _gpu import GPU, TWO_GPUS

pytestmark = [*GPU, TWO_GPUS]

SCRIPT = Path(__file__).resolve().parent / "_ddp_eval.py"
REPO = Path(__file__).resolve().parents[2]
# NVLink multicast stays off in NCCL/PyTorch/NVSHMEM (shared machines: see the device notes), also in the children
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def run(tmp_path: Path, *args: str) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    for name, value in NO_MULTICAST.items():
        env.setdefault(name, value)
    done = subprocess.run([sys.executable, str(SCRIPT), *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=540)
    assert done.returncode == 0, f"{args}: exit {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"


def test_two_gpu_evaluation_equals_one_gpu(tmp_path):
    root = tmp_path / "run"
    run(tmp_path, "fit", str(root))
    run(tmp_path, "validate", str(root), "1")
    run(tmp_path, "validate", str(root), "2")
    fit, one, two = (json.loads((root / name / "metrics.json").read_text())
                     for name in ("fit", "validate_1", "validate_2"))
    last = len(fit["accuracy_matrix"]) - 1
    assert all(v is not None for v in fit["accuracy_matrix"][last])
    assert one["accuracy_matrix"][last] == fit["accuracy_matrix"][last]
    assert two["accuracy_matrix"] == one["accuracy_matrix"]
    assert two["last_evaluation"] == one["last_evaluation"]
    # accuracies of 21 test images per task: each entry is a count / 21 in percent
    assert all(abs(v * 21 / 100 - round(v * 21 / 100)) < 1e-9 for v in two["accuracy_matrix"][last])
