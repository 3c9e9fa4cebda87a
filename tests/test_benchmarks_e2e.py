"""benchmarks/e2e.py --tiny: the real `cdl fit` with the phase timer, on CPU, as CI runs it."""

import gzip
import importlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cdl_lightning.data import ContinualDataModule, SyntheticShapes

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # a benchmark subprocess run (about 14 s)
def test_e2e_tiny_phases_add_up_to_the_wall_time(tmp_path):
    out = tmp_path / "result.json"
    dm = ContinualDataModule(SyntheticShapes(), num_tasks=2)
    per_task = [len(dm.task_dataset("train", t)) for t in range(2)]
    first_epoch = math.ceil(per_task[0] / 16)  # batches of 16
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    begin = time.time()
    run = subprocess.run(
        [sys.executable, str(REPO / "benchmarks/e2e.py"), "--tiny", "--no-step", "--no-progress-bar",
         "--out", str(tmp_path / "runs"), "--json", str(out), "--profile-steps", "5",
         "--profile-at", str(first_epoch - 3),
         "--profile-trace", str(tmp_path / "trace.json.gz"), "--", "--evaluation.print_table", "false"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    outer_wall = time.time() - begin
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    seconds = result["seconds"]
    assert set(seconds) == {"startup", "train", "validation", "checkpoint", "other"}
    # the phases partition the run's wall time (rounded to ms each) ...
    assert math.isclose(sum(seconds.values()), result["wall"], abs_tol=0.01)
    # ... which is the subprocess's lifetime minus what follows the fit (the report, interpreter exit)
    assert result["wall"] <= outer_wall + 0.05  # (the process start is read to the clock tick, 10 ms)
    assert result["wall"] >= outer_wall - 5.0
    assert seconds["startup"] > 0 and seconds["train"] > 0 and seconds["validation"] > 0
    assert seconds["checkpoint"] > 0  # last.ckpt is written every epoch
    last = next((tmp_path / "runs").rglob("last.ckpt"))
    assert result["checkpoints"] == {"saves": 2, "last_mb": round(last.stat().st_size / 1e6, 2)}  # 2 tasks x 1 epoch
    assert f"checkpoints: 2 saves in {seconds['checkpoint']:.2f} s" in run.stdout
    # every training image of the 2 tasks went through exactly one step, in batches of 16
    assert result["train_images"] == sum(per_task)
    assert result["train_batches"] == sum(math.ceil(n / 16) for n in per_task)
    assert result["train_img_per_s"] == round(sum(per_task) / seconds["train"], 1)
    assert result["fraction_of_step_rate"] is None  # --no-step
    # steady: each epoch's batches after its first 5 (2 epochs here), timed within the train phase
    steady = result["steady"]
    assert steady["images"] == sum(per_task) - 2 * 5 * 16
    assert 0 < steady["seconds"] < seconds["train"]
    assert steady["img_per_s"] == round(steady["images"] / steady["seconds"], 1)
    assert steady["fraction_of_step_rate"] is None
    assert f"steady: {steady['images']} images (each epoch after its first 5 batches)" in run.stdout
    # per epoch (one per task here): the train time and images partition the phase's, the steady part inside each
    epochs = result["epochs"]
    assert [e["epoch"] for e in epochs] == [0, 1] and [e["images"] for e in epochs] == per_task
    assert math.isclose(sum(e["seconds"] for e in epochs), seconds["train"], abs_tol=0.01)
    assert sum(e["steady_images"] for e in epochs) == steady["images"]
    assert all(0 < e["steady_seconds"] < e["seconds"] for e in epochs)
    starts = result["epoch_starts"]  # the run's first epoch, the second task's first epoch, no later epochs
    rate = steady["images"] / sum(e["steady_seconds"] for e in epochs)
    first = epochs[0]
    assert starts["run_first_s"] == pytest.approx(
        first["seconds"] - first["steady_seconds"] - (first["images"] - first["steady_images"]) / rate, abs=2e-3)
    assert starts["task_first_n"] == 1 and starts["later_n"] == 0 and starts["later_s"] is None
    assert "epoch starts (each epoch's first 5 batches beyond the steady rate): the run's first epoch" in run.stdout
    printed = next(line for line in run.stdout.splitlines() if line.startswith('{"bench": "cdl-e2e"'))
    assert json.loads(printed)["seconds"] == seconds
    # --profile-steps 5 from the first epoch's third-last batch: cut at its last batch, before validation, so 3
    # steps (no GPU here: no kernel time, all of the step is "idle")
    profile = result["profile"]
    assert profile["steps"] == 3 and profile["cut_at_epoch_end"] is True
    assert profile["kernels_per_step"] == 0 and profile["gpu_busy_ms_per_step"] == 0
    assert 0 < profile["wall_ms_per_step"] < 1e3 * seconds["train"]
    assert profile["gpu_idle_ms_per_step"] == profile["wall_ms_per_step"]
    assert f"profile of training batches {first_epoch - 3}..{first_epoch - 1}" in run.stdout
    with gzip.open(tmp_path / "trace.json.gz", "rt") as trace:
        names = {event.get("name") for event in json.load(trace)["traceEvents"]}
    assert "Optimizer.step#Adam.step" in names  # the profiled window holds whole optimizer steps


def test_projection_of_the_committed_packed_snapshot_runs(monkeypatch, capsys):
    """benchmarks/projection.py on the committed H200 measurement: startup and validation once, the rest x 20/3."""
    root = Path(__file__).resolve().parents[1]
    monkeypatch.syspath_prepend(str(root / "benchmarks"))
    projection = importlib.import_module("projection")
    measured = root / "benchmarks/measured/2026-12-01_h200_packed_snapshots/call1"
    summary = projection.main([str(measured / "e2e_teacher_1gpu.json"), str(measured / "e2e_student_1gpu.json")])
    teacher, student = summary["stages"]
    assert teacher["wall"] == pytest.approx(16.176 + 10.239 + (70.38 + 6.631 + 0.62) * 20 / 3)
    assert student["wall"] == pytest.approx(15.798 + 8.988 + (75.503 + 4.563 + 0.779) * 20 / 3)
    assert summary["total_s"] == pytest.approx(teacher["wall"] + student["wall"])
    assert round(summary["total_s"] / 60, 2) == 18.46
    assert teacher["train_fraction"] == pytest.approx(70.38 * 20 / 3 / teacher["wall"])
    assert "over the 15-minute goal" in capsys.readouterr().out
    steady = projection.main([str(measured / "e2e_teacher_1gpu.json"), "--steady", "--goal-minutes", "10"])
    assert steady["stages"][0]["train"] == pytest.approx(150000 / 2240.3 * 20 / 3)


def _e2e_result(epochs_per_task: int, epoch_starts: dict | None) -> dict:
    """An e2e.py result of 2 tasks x ``epochs_per_task`` epochs of 1,000 images at a steady 500 img/s."""
    result = {"bench": "cdl-e2e", "seconds": {"startup": 10.0, "train": 0.0, "validation": 4.0, "checkpoint": 1.0,
                                              "other": 0.5},
              "args": {"epochs_per_task": epochs_per_task, "num_tasks": 2, "model": "kdp-b-s"},
              "train_images": 2000 * epochs_per_task, "world_size": 1, "steady": {"img_per_s": 500.0}}
    result["seconds"]["train"] = 4.0 * epochs_per_task + 3.0
    if epoch_starts is not None:
        result["epoch_starts"] = epoch_starts
    return result


def test_projection_with_epoch_starts_counts_each_kind_of_epoch(tmp_path, monkeypatch, capsys):
    """--epoch-starts: all images at the steady rate, plus the run's first epoch's start once, each other task's
    first epoch's once per task, the later epochs' once per later epoch (not the run's first scaled by P / E)."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    projection = importlib.import_module("projection")
    run = tmp_path / "run.json"
    starts = {"run_first_s": 2.0, "task_first_s": 0.6, "task_first_n": 1, "later_s": 0.1, "later_n": 2}
    run.write_text(json.dumps(_e2e_result(2, starts)))
    stage = projection.main([str(run), "--epoch-starts"])["stages"][0]
    # 2 tasks x 20 epochs x 1,000 images at 500 img/s; + 2.0 + 1 x 0.6 + 2 x 19 x 0.1
    assert stage["train"] == pytest.approx(40000 / 500 + 2.0 + 0.6 + 3.8)
    assert stage["wall"] == pytest.approx(10.0 + 4.0 + stage["train"] + (1.0 + 0.5) * 10)
    assert "steady train rate + measured epoch starts" in capsys.readouterr().out
    assert projection.main([str(run), "--steady"])["stages"][0]["train"] == pytest.approx(40000 / 500)
    assert projection.main([str(run)])["stages"][0]["train"] == pytest.approx((4.0 * 2 + 3.0) * 10)
    for result, message in ((_e2e_result(2, None), "no per-epoch record"),
                            (_e2e_result(1, {**starts, "later_s": None, "later_n": 0}), "has no later epochs")):
        run.write_text(json.dumps(result))
        with pytest.raises(SystemExit) as exit_info:
            projection.main([str(run), "--epoch-starts"])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        projection.main([str(run), "--steady", "--epoch-starts"])  # one mode at a time


def test_projection_refuses_what_is_not_an_e2e_result(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    projection = importlib.import_module("projection")
    other = tmp_path / "other.json"
    other.write_text('{"bench": "cdl-throughput"}')
    for argv, message in (([str(tmp_path / "missing.json")], "does not exist"),
                          ([str(other)], "is not an e2e.py result"),
                          ([str(other), "--epochs-per-task", "0"], "--epochs-per-task must be >= 1")):
        with pytest.raises(SystemExit) as exit_info:
            projection.main(argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
