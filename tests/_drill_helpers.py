"""Callbacks that stage failures for the drills in ``test_drills.py`` (loaded by ``cdl fit`` as
``--trainer.callbacks+=_drill_helpers.<Name>`` with ``tests/`` on ``PYTHONPATH``)."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from lightning.pytorch import Callback


class StallAt(Callback):
    """At the end of global step ``step`` (before any checkpoint of that step), write ``marker`` and sleep: the test
    then kills the process with SIGKILL, a crash at a known point."""

    def __init__(self, step: int, marker: str) -> None:
        self.step, self.marker = step, marker

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            Path(self.marker).write_text(str(trainer.current_epoch))
            time.sleep(600)


class PoisonAt(Callback):
    """Before the batch of global step ``step``, set one trainable parameter to NaN: a divergence at a known point."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            parameter = next(p for p in pl_module.parameters() if p.requires_grad)
            with torch.no_grad():
                parameter.fill_(float("nan"))
