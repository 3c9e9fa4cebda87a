"""`cdl sweep` through the real entry point: a 1 learner x 2 methods x 2 seeds grid of tiny CPU runs (2 tasks x 1
epoch) writes a table equal to the runs' metrics.json, skips finished runs on a rerun, and a killed sweep resumes."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cdl_lightning.cli import main
from cdl_lightning.sweep import load_sweep, plan

ROOT = Path(__file__).resolve().parents[1]
TINY = {"name": "vit_tiny_patch16_224", "pretrained": False,
        "model_kwargs": {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}}
PROMPTS = {
    "coda": {"class_path": "cdl_lightning.nn.prompts.CodaPrompt",
             "init_args": {"pool_size": 4, "length": 2, "layers": [0, 1]}},
    "l2p": {"class_path": "cdl_lightning.nn.prompts.L2P",
            "init_args": {"pool_size": 4, "length": 2, "top_k": 2, "layers": [0]}},
}


def _write_configs(tmp_path: Path, learners: list[str]) -> dict[str, dict[str, str]]:
    common = {
        "trainer": {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False, "log_every_n_steps": 1,
                    "limit_train_batches": 2},
        "data": {"source": {"class_path": "cdl_lightning.data.SyntheticShapes",
                            "init_args": {"num_classes": 4, "seed": 0, "train_per_class": 8, "test_per_class": 4}},
                 "num_tasks": 2, "epochs_per_task": 1, "batch_size": 8, "image_size": 32},
        "evaluation": {"print_table": False},
    }
    out = {}
    for learner in learners:
        teacher = {**common, "model": {"class_path": "cdl_lightning.models.PromptLearner",
                                       "init_args": {"backbone": TINY, "prompt": PROMPTS[learner], "lr": 0.01}}}
        student_backbone = {**TINY, "model_kwargs": {**TINY["model_kwargs"], "embed_dim": 16}}
        student = {**common, "model": {"class_path": "cdl_lightning.models.Distiller",
                                       "init_args": {"backbone": student_backbone, "prompt": PROMPTS[learner],
                                                     "lr": 0.01}}}
        out[learner] = {}
        for role, config in (("teacher", teacher), ("student", student)):
            path = tmp_path / f"{learner}_{role}.yaml"
            path.write_text(yaml.safe_dump(config))
            out[learner][role] = str(path)
    return out


def _sweep_file(tmp_path: Path, learners: list[str], methods: list[str], seeds: list[int]) -> Path:
    spec = {"out": str(tmp_path / "sweep"), "seeds": seeds, "learners": _write_configs(tmp_path, learners),
            "methods": {m: str(ROOT / "configs" / "methods" / f"{m}.yaml") for m in methods}}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.slow  # 6 cdl fit subprocesses, two at a time, then a rerun (about 25 s on 2 cores)
def test_sweep_grid_table_and_skip(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    sweep = _sweep_file(tmp_path, ["coda"], ["none", "kd"], [0, 1])
    # `--gpus 0,0`: two runs at a time (the configs say accelerator cpu; the device id only sets CUDA_VISIBLE_DEVICES)
    main(["sweep", str(sweep), "--gpus", "0,0"])
    out = tmp_path / "sweep"
    result = json.loads((out / "runs.json").read_text())
    runs = result["runs"]
    assert len(runs) == 2 * (1 + 2) and all(r["status"] == "done" for r in runs)
    # every run's result is its metrics.json's final row, and the table is their mean / sample std over the seeds
    for learner in ("coda",):
        for method in ("teacher", "none", "kd"):
            finals = [json.loads((out / learner / f"seed{s}" / method / "metrics.json").read_text())["final"]
                      for s in (0, 1)]
            assert all(f["task"] == 1 for f in finals)
            accs = [f["avg_acc"] for f in finals]
            mean = sum(accs) / 2
            std = math.sqrt(sum((a - mean) ** 2 for a in accs))  # n - 1 = 1
            assert result["table"][learner][method]["avg_acc"] == pytest.approx([mean, std], abs=1e-9)
            assert result["table"][learner][method]["seeds"] == 2
            assert f"{mean:.2f} ± {std:.2f}" in (out / "table.md").read_text()
    # the differences to `none`, flagged against the seeds' spread
    table = result["table"]["coda"]
    diff = table["kd"]["avg_acc"][0] - table["none"]["avg_acc"][0]
    verdict = "yes" if abs(diff) > table["kd"]["avg_acc"][1] + table["none"]["avg_acc"][1] else "within the spread"
    assert f"{diff:+.2f} ({verdict})" in (out / "table.md").read_text()
    # the students were taught by their own seed's teacher, and the recorded command says so
    kd = next(r for r in runs if r["learner"] == "coda" and r["method"] == "kd" and r["seed"] == 1)
    assert str(out / "coda" / "seed1" / "teacher" / "checkpoints" / "last.ckpt") in kd["command"]
    assert "--seed_everything 1" in kd["command"] and kd["command"].startswith("cdl fit --config")
    # the diagonal and its ratio to chance (100 / classes seen), from metrics.json's matrix and task sizes
    metrics = json.loads((out / "coda" / "seed0" / "none" / "metrics.json").read_text())
    assert metrics["task_sizes"] == [2, 2]
    diagonal = [metrics["accuracy_matrix"][t][t] for t in range(2)]
    none = next(r for r in runs if r["learner"] == "coda" and r["method"] == "none" and r["seed"] == 0)
    assert none["diagonal"] == pytest.approx(sum(diagonal) / 2)
    assert none["diagonal_vs_chance"] == pytest.approx(min(diagonal[0] * 2 / 100, diagonal[1] * 4 / 100))
    assert "Mean diagonal accuracy" in (out / "table.md").read_text()
    csv_lines = (out / "runs.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + 6 and csv_lines[0].startswith("learner,method,seed,status,avg_acc")
    # a rerun trains nothing: every run is skipped and no file of a run changes
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.parent != out}
    capsys.readouterr()
    main(["sweep", str(sweep)])
    assert "6 runs (6 skipped as finished, 0 failed)" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.parent != out} == stamps
    rerun = json.loads((out / "runs.json").read_text())
    assert rerun["table"] == result["table"]
    main(["sweep", str(sweep), "--table-only"])  # reads the finished runs from disk: done, same table
    only = json.loads((out / "runs.json").read_text())
    assert only["table"] == result["table"] and {r["status"] for r in only["runs"]} == {"done"}


def test_stop_after_zero_starts_nothing_and_exits_3(tmp_path, monkeypatch, capsys):
    """``--stop-after 0``: no run starts (nothing is trained), every run says so, exit status 3."""
    monkeypatch.chdir(tmp_path)
    sweep = _sweep_file(tmp_path, ["coda"], ["none"], [0])
    with pytest.raises(SystemExit) as stop:
        main(["sweep", str(sweep), "--stop-after", "0"])
    assert stop.value.code == 3
    assert "2 runs not started (--stop-after); run the same command again" in capsys.readouterr().out
    runs = json.loads((tmp_path / "sweep" / "runs.json").read_text())["runs"]
    assert [r["status"] for r in runs] == ["not started (--stop-after)"] * 2
    assert not (tmp_path / "sweep" / "coda" / "seed0").exists()
    with pytest.raises(SystemExit) as stop:
        main(["sweep", str(sweep), "--stop-after", "-1"])
    assert stop.value.code == 2 and "--stop-after needs SECONDS >= 0" in capsys.readouterr().err


@pytest.mark.slow  # a teacher run, then its student in a second call (about 25 s)
def test_stop_after_lets_the_run_in_flight_finish_and_the_next_call_continues(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    sweep = _sweep_file(tmp_path, ["coda"], ["none"], [0])
    with pytest.raises(SystemExit) as stop:  # one run at a time: the teacher starts at once, the student never
        main(["sweep", str(sweep), "--stop-after", "0.5"])
    assert stop.value.code == 3
    runs = {r["method"]: r for r in json.loads((tmp_path / "sweep" / "runs.json").read_text())["runs"]}
    assert runs["teacher"]["status"] == "done" and runs["none"]["status"] == "not started (--stop-after)"
    capsys.readouterr()
    main(["sweep", str(sweep)])  # continues: the teacher is skipped, the student runs
    assert "2 runs (1 skipped as finished, 0 failed)" in capsys.readouterr().out
    runs = {r["method"]: r for r in json.loads((tmp_path / "sweep" / "runs.json").read_text())["runs"]}
    assert runs["none"]["status"] == "done" and runs["teacher"]["status"] == "skipped (finished)"


def test_runs_per_gpu_fills_each_gpu(tmp_path, monkeypatch):
    """``--gpus 0,1 --runs-per-gpu 3``: six slots, spread over the GPUs first; bad values are refused."""
    import cdl_lightning.sweep as sweep

    seen = {}

    def fake_run_sweep(spec, gpus, dry_run=False, stop_after=None):
        seen["gpus"] = gpus
        return []

    monkeypatch.setattr(sweep, "run_sweep", fake_run_sweep)
    monkeypatch.setattr(sweep, "summarise", lambda spec, runs: {"markdown": ""})
    monkeypatch.chdir(tmp_path)
    path = _sweep_file(tmp_path, ["coda"], ["none"], [0])
    main(["sweep", str(path), "--gpus", "0,1", "--runs-per-gpu", "3"])
    assert seen["gpus"] == ["0", "1", "0", "1", "0", "1"]
    for bad in (["--runs-per-gpu", "0", "--gpus", "0"], ["--runs-per-gpu", "2"]):
        with pytest.raises(SystemExit) as stop:
            main(["sweep", str(path), *bad])
        assert stop.value.code == 2


def test_seeds_and_learners_slice_the_grid(tmp_path, monkeypatch, capsys):
    """``--seeds 3,4 --learners l2p``: the same grid restricted (same run folders); an unknown learner is refused."""
    import cdl_lightning.sweep as sweep

    seen = {}
    monkeypatch.setattr(sweep, "run_sweep", lambda spec, gpus, dry_run=False, stop_after=None: seen.update(spec) or [])
    monkeypatch.setattr(sweep, "summarise", lambda spec, runs: {"markdown": ""})
    monkeypatch.chdir(tmp_path)
    path = _sweep_file(tmp_path, ["coda", "l2p"], ["none"], [0])
    main(["sweep", str(path), "--seeds", "3,4", "--learners", "l2p"])
    assert seen["seeds"] == [3, 4] and list(seen["learners"]) == ["l2p"]
    for bad in (["--learners", "dual"], ["--seeds", "one"]):
        with pytest.raises(SystemExit) as stop:
            main(["sweep", str(path), *bad])
        assert stop.value.code == 2


def test_diagonal_summary_against_chance():
    """Mean diagonal and the smallest diagonal / chance ratio, chance = 100 / classes seen after each task."""
    from cdl_lightning.sweep import diagonal_summary

    nan = float("nan")
    metrics = {"accuracy_matrix": [[60.0, nan, nan], [30.0, 40.0, nan], [20.0, 25.0, 12.0]], "task_sizes": [10, 5, 5]}
    mean, ratio = diagonal_summary(metrics)
    assert mean == pytest.approx((60 + 40 + 12) / 3)
    assert ratio == pytest.approx(min(60 * 10, 40 * 15, 12 * 20) / 100)  # 6.0, 6.0, 2.4 -> 2.4
    assert math.isnan(diagonal_summary({**metrics, "task_sizes": None})[1])  # older metrics.json: no ratio
    gap = {"accuracy_matrix": [[60.0, None], [30.0, None]], "task_sizes": [10, 10]}  # a row without its diagonal
    assert diagonal_summary(gap) == (60.0, pytest.approx(6.0))


KILLER = '''
import os, signal
from pathlib import Path
from lightning.pytorch.callbacks import Callback

class KillSweepOnce(Callback):
    """Kills the whole sweep (its process group) at the start of epoch 1, once (while the trigger file exists)."""
    def on_train_epoch_start(self, trainer, pl_module):
        trigger = Path(os.environ["KILL_TRIGGER"])
        if trainer.current_epoch == 1 and trigger.exists():
            trigger.unlink()
            os.killpg(os.getpgid(0), signal.SIGKILL)
'''


@pytest.mark.slow  # a sweep killed and resumed (about 40 s)
def test_killed_sweep_resumes_from_last_checkpoint(tmp_path):
    sweep = _sweep_file(tmp_path, ["coda"], ["none"], [0])
    spec = yaml.safe_load(sweep.read_text())
    spec["teacher_overrides"] = ["--trainer.callbacks+=killer.KillSweepOnce"]
    sweep.write_text(yaml.safe_dump(spec))
    (tmp_path / "killer.py").write_text(KILLER)
    trigger = tmp_path / "trigger"
    trigger.touch()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "KILL_TRIGGER": str(trigger)}
    command = [sys.executable, "-m", "cdl_lightning.cli", "sweep", str(sweep)]
    first = subprocess.run(command, cwd=tmp_path, env=env, start_new_session=True, capture_output=True, text=True,
                           timeout=600)
    assert first.returncode == -signal.SIGKILL, first.stdout + first.stderr
    teacher = tmp_path / "sweep" / "coda" / "seed0" / "teacher"
    assert not trigger.exists() and (teacher / "checkpoints" / "last.ckpt").exists()
    assert json.loads((teacher / "metrics.json").read_text())["final"]["task"] == 0  # killed after task 0
    time.sleep(0.01)
    second = subprocess.run(command, cwd=tmp_path, env=env, start_new_session=True, capture_output=True, text=True,
                            timeout=600)
    assert second.returncode == 0, second.stdout + second.stderr
    runs = {r["method"]: r for r in json.loads((tmp_path / "sweep" / "runs.json").read_text())["runs"]}
    assert runs["teacher"]["status"] == "resumed, done" and runs["none"]["status"] == "done"
    log = (teacher / "sweep.log").read_text()
    assert f"--ckpt_path {teacher / 'checkpoints' / 'last.ckpt'}" in log
    assert json.loads((teacher / "metrics.json").read_text())["final"]["task"] == 1


def test_sweep_file_errors_name_the_problem(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"out": "x", "seeds": [0], "learners": {"coda": {"teacher": "missing.yaml"}}}))
    with pytest.raises(ValueError, match="learner 'coda' needs a teacher and a student config"):
        load_sweep(str(bad))
    bad.write_text(yaml.safe_dump({"out": "x", "seeds": [0], "learners": {}, "method": []}))
    with pytest.raises(ValueError, match=r"unknown keys \['method'\]"):
        load_sweep(str(bad))


def test_shipped_sweep_files_plan_the_paper_grid(monkeypatch):
    monkeypatch.chdir(ROOT)
    spec = load_sweep("configs/sweeps/cifar100.yaml")
    runs = plan(spec)
    assert len(runs) == len(spec["learners"]) * len(spec["seeds"]) * (1 + len(spec["methods"]))
    assert {r.method for r in runs} == {"teacher", "none", "kd", "dkd", "fitnets", "reviewkd", "deit", "kdp"}
    for name in ("configs/sweeps/imagenet_r.yaml", "configs/proxy/sweep.yaml", "configs/proxy/sweep_coda_seed0.yaml"):
        assert len(plan(load_sweep(name))) > 0
    # the packed proxy sweep: the same runs (folders, seeds, methods) as the full-pack one, plus the data override
    full, packed = plan(load_sweep("configs/proxy/sweep.yaml")), plan(load_sweep("configs/proxy/sweep_packed.yaml"))
    assert [r.run_dir for r in packed] == [r.run_dir for r in full] and len(full) == 3 * 3 * 8
    override = ["--data.source.init_args.path", "runs/proxy/tiny-imagenet-proxy-cl.npz",
                "--data.source.init_args.classes", "null"]
    for a, b in zip(full, packed):
        position = b.args.index(override[0])
        assert b.args[position : position + 4] == override
        assert b.args[:position] + b.args[position + 4 :] == a.args
