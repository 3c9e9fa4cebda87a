"""`cdl_lightning.launch`: a ``cdl fit`` on several devices of one node starts its local ranks at once (before the
heavy imports) instead of inside ``trainer.fit``; the run equals a one-process run; the ranks die together."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from _cli_helpers import small_coda_fit_args
from lightning.pytorch import Callback

from cdl_lightning import launch
from cdl_lightning.launch import local_process_count, local_ranks

REPO = Path(__file__).resolve().parents[1]
DDP = ("--trainer.devices", "2", "--trainer.strategy", "ddp")


class ExitOnRank(Callback):
    """Drill: the process of global rank ``rank`` exits with status ``code`` at the end of global step ``step``."""

    def __init__(self, rank: int, step: int, code: int = 3) -> None:
        self.rank, self.step, self.code = rank, step, code

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            os._exit(self.code)


class StallAt(Callback):
    """Drill: every rank writes ``marker.RANK`` and sleeps at the end of global step ``step`` (to be killed)."""

    def __init__(self, step: int, marker: str) -> None:
        self.step, self.marker = step, marker

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            Path(f"{self.marker}.{trainer.global_rank}").write_text(str(os.getpid()))
            time.sleep(600)


class SlowFrom(Callback):
    """Drill: from global step ``step`` on, every batch takes 0.5 s more; ``marker.RANK`` says it began."""

    def __init__(self, step: int, marker: str) -> None:
        self.step, self.marker = step, marker

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            Path(f"{self.marker}.{trainer.global_rank}").write_text(str(os.getpid()))
            time.sleep(0.5)


def _cdl(args: list[str], tmp_path: Path, new_session: bool = False, **env: str) -> subprocess.Popen:
    """``cdl ARGS`` as the console script runs it (``cdl_lightning.launch:main``), in a subprocess."""
    path = os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])
    environment = {key: value for key, value in os.environ.items() if key not in launch.EXTERNAL}
    environment.update({"PYTHONPATH": path, "OMP_NUM_THREADS": "1", "CDL_STARTUP_LOG": str(tmp_path / "startup.log")})
    return subprocess.Popen([sys.executable, "-m", "cdl_lightning.launch", *args], cwd=tmp_path, text=True,
                            env={**environment, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=new_session)


def _startup(tmp_path: Path) -> dict[tuple[str, int], float]:
    """``(event, local rank) -> time`` from the startup log."""
    marks = {}
    for line in (tmp_path / "startup.log").read_text().splitlines():
        event, rank, _, when = line.split()
        marks[(event, int(rank))] = float(when)
    return marks


def _finish(process: subprocess.Popen, timeout: float = 240) -> str:
    return process.communicate(timeout=timeout)[0]


# ---------------------------------------------------------------- what is started, from the options alone
@pytest.fixture
def clean_env(monkeypatch):
    for name in (*launch.EXTERNAL, launch.OPT_OUT):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(launch, "_cuda_count", lambda: 4)  # a node with 4 GPUs


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (["--trainer.devices", "2"], 2),
        (["--trainer.devices=[0, 1]"], 2),
        (["--trainer.devices", "0,1,2"], 3),
        (["--trainer.devices", "-1"], 4),
        (["--trainer.devices", "auto"], 4),
        ([], 4),  # Lightning's defaults: accelerator auto, devices auto: every GPU
        (["--trainer.accelerator", "gpu", "--trainer.devices", "auto"], 4),
        (["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"], 2),
        (["--trainer.accelerator", "cpu"], 1),  # CPU, devices auto: one process
        (["--trainer.devices", "1"], 1),
        (["--trainer.devices", "2", "--trainer.num_nodes", "2"], 1),  # several nodes: a launcher's job
        (["--trainer.devices", "2", "--trainer.strategy", "ddp_spawn"], 1),  # Lightning spawns
        (["--trainer.devices", "2", "--trainer.strategy.init_args.start_method", "spawn"], 1),
        (["--trainer.devices", "2", "--trainer.accelerator", "mps"], 1),
    ],
)
def test_local_process_count_from_the_command_line(clean_env, options, expected):
    assert local_process_count(["fit", "--model.lr", "0.1", *options, "--debug"])[0] == expected


def test_local_process_count_from_config_files_and_when_nothing_is_started(clean_env, tmp_path, monkeypatch):
    base = tmp_path / "base.yaml"
    base.write_text("trainer:\n  accelerator: cpu\n  devices: 3\n  strategy: ddp\nseed_everything: 7\n")
    child = tmp_path / "child.yaml"
    child.write_text("_base_: [base.yaml]\ntrainer:\n  devices: 2\nmodel:\n  init_args: {lr: 0.1}\n")
    count, options = local_process_count(["fit", "--config", str(child)])
    assert count == 2 and options["seed_everything"] == 7 and options["trainer"]["accelerator"] == "cpu"
    assert local_process_count(["fit", "--config", str(child), "--trainer.devices", "4"])[0] == 4
    assert local_process_count(["validate", "-c", str(base)])[0] == 3
    strategy = tmp_path / "strategy.yaml"
    strategy.write_text("trainer:\n  devices: 2\n  strategy:\n    class_path: lightning.pytorch.strategies.DDPStrategy"
                        "\n    init_args: {find_unused_parameters: true}\n")
    assert local_process_count(["fit", "--config", str(strategy)])[0] == 2
    # nothing started: other subcommands, help, a config this reader cannot read, a launcher's process, the opt-out
    for argv in (["predict", "--config", str(base)], ["fit", "--config", str(base), "--help"],
                 ["fit", "--config", str(base), "--print_config"], ["compare", "a"],
                 ["fit", "--config", str(tmp_path / "missing.yaml")]):
        assert local_process_count(argv)[0] == 1, argv
    for name, value in (("LOCAL_RANK", "0"), ("RANK", "1"), ("SLURM_NTASKS", "2"), (launch.OPT_OUT, "0")):
        with monkeypatch.context() as context:
            context.setenv(name, value)
            assert local_process_count(["fit", "--config", str(base)])[0] == 1, name


def test_local_ranks_sets_and_restores_lightnings_environment(clean_env, monkeypatch):
    started = []

    class FakeProcess:
        pid, returncode = 12345, 0

        def __init__(self, command, env, **kwargs):
            started.append((command, env))

        def poll(self):
            return 0

        def wait(self, timeout=None):
            return 0

    monkeypatch.setattr(launch.subprocess, "Popen", FakeProcess)
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    argv = ["fit", "--trainer.accelerator", "cpu", "--trainer.devices", "3", "--trainer.strategy", "ddp"]
    with local_ranks(argv) as count:
        assert count == 3
        inside = dict(os.environ)
    assert [env["LOCAL_RANK"] for _, env in started] == ["1", "2"]
    assert all(command[1:] == ["-m", "cdl_lightning.launch", *argv] for command, _ in started)
    for env in (inside, *(env for _, env in started)):
        assert env["WORLD_SIZE"] == "3" and env["NODE_RANK"] == "0" and env["MASTER_ADDR"] == "127.0.0.1"
        assert env["MASTER_PORT"] == inside["MASTER_PORT"] and env["PL_GLOBAL_SEED"] == inside["PL_GLOBAL_SEED"]
    assert inside["LOCAL_RANK"] == "0"
    for name in ("LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "PL_GLOBAL_SEED", launch.PARENT):
        assert name not in os.environ
    # a seed in the config: each rank seeds itself with it; no shared random seed is drawn
    started.clear()
    with local_ranks([*argv, "--seed_everything", "3"]):
        assert "PL_GLOBAL_SEED" not in os.environ


# ---------------------------------------------------------------- through the real CLI, 2 CPU processes (gloo)
@pytest.mark.slow  # a 2-process and a 1-process cdl fit (about 25 s)
def test_two_cpu_ranks_start_together_and_evaluate_like_one_process(tmp_path):
    # lr 0: the weights stay at their seeded initialisation, so the 2-process matrix must equal the 1-process one;
    # Lightning's per-step SIGTERM check thinned to every 3 steps (`SigtermCheck`) changes no number either
    thinned = ("--trainer.callbacks+=cdl_lightning.callbacks.SigtermCheck", "--trainer.callbacks.every_n_steps=3")
    ddp = _cdl(small_coda_fit_args(tmp_path / "ddp", "--model.lr", "0.0", *DDP, *thinned), tmp_path)
    output = _finish(ddp)
    assert ddp.returncode == 0, output[-3000:]
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in output
    marks = _startup(tmp_path)
    startup = marks[("fit", 0)] - marks[("main", 0)]  # rank 0: imports, config, model and data module
    assert abs(marks[("main", 1)] - marks[("main", 0)]) < 0.25 * startup, marks
    assert abs(marks[("fit", 1)] - marks[("fit", 0)]) < 0.5 * startup, marks

    one_dir = tmp_path / "one"
    one_dir.mkdir()
    one = _cdl(small_coda_fit_args(tmp_path / "one", "--model.lr", "0.0"), one_dir)
    output = _finish(one)
    assert one.returncode == 0, output[-3000:]
    ours, single = (json.loads((tmp_path / name / "run" / "metrics.json").read_text()) for name in ("ddp", "one"))
    assert ours["status"] == single["status"] == "complete" and ours["filled_rows"] == [0, 1, 2]
    assert ours["accuracy_matrix"] == single["accuracy_matrix"]
    assert ours["last_evaluation"] == single["last_evaluation"] and ours["last_evaluation"]["total"] == [10, 10, 10]


@pytest.mark.slow  # a 2-process cdl fit stopped by its rank 1 (about 12 s)
def test_a_failing_rank_stops_the_run_with_a_nonzero_status(tmp_path):
    drill = ("--trainer.callbacks+=test_ddp_launch.ExitOnRank", "--trainer.callbacks.rank=1",
             "--trainer.callbacks.step=6")  # 2 steps per epoch and rank: after task 0's evaluation (step 4)
    process = _cdl(small_coda_fit_args(tmp_path, *DDP, *drill), tmp_path)
    output = _finish(process)
    assert process.returncode != 0, output[-3000:]
    assert "exited with status 3" in output, output[-3000:]
    result = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert result["status"] == "failed" and result["filled_rows"] == [0]


def _stalled(tmp_path: Path, new_session: bool = False) -> tuple[subprocess.Popen, int]:
    """A 2-process ``cdl fit`` whose ranks both sleep at the end of step 6 (after task 0's evaluation at step 4);
    returns rank 0's process and rank 1's pid."""
    marker = tmp_path / "stalled"
    drill = ("--trainer.callbacks+=test_ddp_launch.StallAt", "--trainer.callbacks.step=6",
             f"--trainer.callbacks.marker={marker}")
    process = _cdl(small_coda_fit_args(tmp_path, *DDP, *drill), tmp_path, new_session)
    deadline = time.monotonic() + 200
    while not all(Path(f"{marker}.{rank}").exists() for rank in (0, 1)):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(process.communicate()[0][-3000:])
        time.sleep(0.2)
    return process, int(Path(f"{marker}.1").read_text())


def _signal_stalled_run(tmp_path: Path, send: Callable[[int], None], expected: int, timeout: float) -> None:
    """A stalled 2-process run (`_stalled`) gets a signal through ``send(rank 0's pid)``: it exits with ``expected``,
    rank 1 is gone and ``metrics.json`` says ``interrupted`` with task 0's row."""
    process, child = _stalled(tmp_path, new_session=True)
    try:
        send(process.pid)
        output = _finish(process, timeout=timeout)
        assert process.returncode == expected, output[-3000:]
        assert not _alive(child)
        result = json.loads((tmp_path / "run" / "metrics.json").read_text())
        assert result["status"] == "interrupted" and result["filled_rows"] == [0]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.communicate()


@pytest.mark.slow  # a 2-process cdl fit interrupted by Ctrl+C (about 12 s)
def test_ctrl_c_stops_every_rank_and_the_run_says_interrupted(tmp_path):
    # what Ctrl+C in a terminal does: SIGINT to every process of the group
    _signal_stalled_run(tmp_path, lambda pid: os.killpg(pid, signal.SIGINT), expected=1, timeout=60)


@pytest.mark.slow  # a 2-process cdl fit stopped by SIGTERM to rank 0 alone (about 15 s)
def test_sigterm_to_rank_zero_stops_every_rank_with_status_143(tmp_path):
    """``kill PID`` / ``timeout`` / a batch system's time limit: rank 0 passes the SIGTERM on (Lightning's own handler
    would otherwise wait for the others in a collective), the run exits 143, never 0, and says ``interrupted``."""
    _signal_stalled_run(tmp_path, lambda pid: os.kill(pid, signal.SIGTERM), expected=143, timeout=90)


SLOW_RANK_ZERO = '''
import importlib.abc, os, sys, time
class SlowRankZero(importlib.abc.MetaPathFinder):
    """Rank 0 (LOCAL_RANK 0, set by the launcher before the CLI's imports) imports jsonargparse 4 s late."""
    done = False
    def find_spec(self, name, path, target=None):
        if name == "jsonargparse" and not SlowRankZero.done and os.environ.get("LOCAL_RANK") == "0":
            SlowRankZero.done = True
            time.sleep(4)
        return None
sys.meta_path.insert(0, SlowRankZero())
'''


@pytest.mark.slow  # a 2-process cdl fit with a mistyped key, rank 0 slowed down (about 15 s)
def test_a_user_error_is_reported_once_with_status_2_even_when_another_rank_fails_first(tmp_path):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SLOW_RANK_ZERO)
    process = _cdl(small_coda_fit_args(tmp_path, *DDP, "--model.prompt.pool_sizee", "3"), tmp_path,
                   PYTHONPATH=os.pathsep.join([str(hook), str(REPO), str(REPO / "tests")]))
    output = _finish(process, timeout=120)
    assert process.returncode == 2, output[-3000:]
    assert output.count("error: unknown key `pool_sizee`") == 1, output[-3000:]
    assert "local rank 1" not in output, output[-3000:]


@pytest.mark.slow  # a 1-process cdl fit stopped by SIGTERM (about 10 s)
def test_sigterm_stops_a_single_process_run_with_status_143(tmp_path):
    marker = tmp_path / "slow"  # Lightning stops at the end of the step that got the SIGTERM
    drill = ("--trainer.callbacks+=test_ddp_launch.SlowFrom", "--trainer.callbacks.step=9",  # task 0 evaluated at 8
             f"--trainer.callbacks.marker={marker}")
    process = _cdl(small_coda_fit_args(tmp_path, *drill), tmp_path)
    deadline = time.monotonic() + 120
    while not Path(f"{marker}.0").exists():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[0][-3000:]
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    output = _finish(process, timeout=60)
    assert process.returncode == 143, output[-3000:]
    assert "stopped by SIGTERM" in output
    result = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert result["status"] == "interrupted" and result["filled_rows"] == [0]


@pytest.mark.slow  # a 2-process cdl fit killed with SIGKILL (about 12 s)
def test_the_other_ranks_die_with_rank_zero(tmp_path):
    process, child = _stalled(tmp_path)
    try:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        deadline = time.monotonic() + 10
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(child)
    finally:
        process.kill()
        process.communicate()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except FileNotFoundError:
        return False
    return state != "Z"  # a zombie waits for init to reap it: it is dead


def test_rank_zero_is_stopped_when_another_rank_fails(clean_env, monkeypatch, capsys):
    class FailedProcess:  # a rank that exits with status 3 as soon as it starts
        pid, returncode = 12345, 3

        def __init__(self, command, env, **kwargs):
            pass

        def poll(self):
            return 3

        def wait(self, timeout=None):
            return 3

    monkeypatch.setattr(launch.subprocess, "Popen", FailedProcess)
    argv = ["fit", "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]
    monkeypatch.setattr(launch, "_GRACE_S", 120.0)  # never reached here: rank 0 runs Python code, so it stops at once
    start = time.monotonic()
    with pytest.raises(SystemExit) as stopped, local_ranks(argv):
        for _ in range(300):  # rank 0's own work, interrupted by the watch
            time.sleep(0.1)
    assert stopped.value.code == 1 and time.monotonic() - start < 10
    assert "local rank 1 (pid 12345) exited with status 3; stopping the run" in capsys.readouterr().err
    assert "LOCAL_RANK" not in os.environ
