"""`SigtermCheck`: Lightning's per-step DDP SIGTERM broadcast thinned to every N steps, restored at teardown; the
numbers of a 2-process run do not change."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from cdl_lightning.callbacks import SigtermCheck

REPO = Path(__file__).resolve().parents[1]


def _trainer_with_loop() -> tuple[SimpleNamespace, list[int]]:
    calls: list[int] = []
    loop = SimpleNamespace()
    loop._broadcast_sigterm_tensor = lambda: calls.append(1)
    return SimpleNamespace(fit_loop=SimpleNamespace(epoch_loop=loop)), calls


def test_every_n_steps_runs_the_check_on_steps_0_n_2n_and_restores_it():
    trainer, calls = _trainer_with_loop()
    original = trainer.fit_loop.epoch_loop._broadcast_sigterm_tensor
    callback = SigtermCheck(every_n_steps=4)
    callback.setup(trainer, None, "fit")
    for _ in range(10):  # the loop calls it once per training batch
        trainer.fit_loop.epoch_loop._broadcast_sigterm_tensor()
    assert len(calls) == 3 and callback.checks == 3  # batches 0, 4 and 8
    callback.teardown(trainer, None, "fit")
    assert trainer.fit_loop.epoch_loop._broadcast_sigterm_tensor is original


def test_default_and_bad_values():
    trainer, calls = _trainer_with_loop()
    original = trainer.fit_loop.epoch_loop._broadcast_sigterm_tensor
    SigtermCheck().setup(trainer, None, "fit")  # every_n_steps=1: Lightning's own check, untouched
    assert trainer.fit_loop.epoch_loop._broadcast_sigterm_tensor is original
    with pytest.raises(ValueError, match="every_n_steps must be >= 1"):
        SigtermCheck(every_n_steps=0)
    with pytest.warns(UserWarning, match="no per-step SIGTERM broadcast"):
        SigtermCheck(every_n_steps=5).setup(SimpleNamespace(fit_loop=SimpleNamespace(epoch_loop=object())), None,
                                            "fit")


@pytest.mark.slow  # two 2-process cdl fits (about 30 s)
def test_two_rank_run_gives_the_same_matrix_with_the_check_thinned(tmp_path):
    sys.path.insert(0, str(REPO / "tests"))
    from _cli_helpers import small_coda_fit_args

    ddp = ("--trainer.devices", "2", "--trainer.strategy", "ddp")
    thinned = ("--trainer.callbacks+=cdl_lightning.callbacks.SigtermCheck", "--trainer.callbacks.every_n_steps=3")
    env = {key: value for key, value in os.environ.items() if key not in ("LOCAL_RANK", "RANK", "WORLD_SIZE")}
    env.update({"PYTHONPATH": os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"})
    results = []
    for name, extra in (("plain", ()), ("thinned", thinned)):
        folder = tmp_path / name
        folder.mkdir()
        done = subprocess.run([sys.executable, "-m", "cdl_lightning.launch",
                               *small_coda_fit_args(folder, *ddp, *extra)], cwd=folder, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
        assert done.returncode == 0, done.stdout[-3000:]
        results.append(json.loads((folder / "run" / "metrics.json").read_text()))
    plain, thinned_result = results
    assert plain["status"] == thinned_result["status"] == "complete"
    assert plain["accuracy_matrix"] == thinned_result["accuracy_matrix"]
