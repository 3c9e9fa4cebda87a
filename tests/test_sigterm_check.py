"""`SigtermCheck`: Lightning's per-step DDP SIGTERM broadcast thinned to every N steps, restored at teardown. That
the numbers of a 2-process run do not change is checked in `test_ddp_launch.py` (its 2-rank run thins the check)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from cdl_lightning.callbacks import SigtermCheck


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
