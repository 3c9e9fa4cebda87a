"""`SigtermCheck`: how often Lightning's DDP training loop asks rank 0 whether it got a SIGTERM.

Lightning (2.5, 2.6) broadcasts rank 0's SIGTERM flag at the start of *every* DDP training step and reads it back on
the host (``_TrainingEpochLoop._broadcast_sigterm_tensor``: ``dist.broadcast`` + ``.item()``). That read waits for the
GPU to finish all the work queued so far, every step: the GPU then idles while the host prepares the next step
(Python of the loop, the batch, the training step) instead of running ahead of it. This callback makes the check run
every ``every_n_steps`` steps instead (on every rank at the same steps, so the collectives stay matched).

Off by default (``every_n_steps=1``: Lightning's behaviour). What it trades: a SIGTERM that reaches rank 0 alone is
acted on up to ``every_n_steps`` steps later, and each rank that received one stops at the end of its own step, so
ranks may stop at different steps; with ``cdl``'s launcher every rank gets the signal and the ones left waiting in a
collective are ended by it (the run exits 143 either way). Numbers do not change.
"""

from __future__ import annotations

import itertools
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

__all__ = ["SigtermCheck"]


class SigtermCheck(Callback):
    """Run Lightning's per-step DDP SIGTERM broadcast every ``every_n_steps`` training steps.

    Args:
        every_n_steps: steps between two checks (>= 1; 1 keeps Lightning's check at every step).
    """

    def __init__(self, every_n_steps: int = 1) -> None:
        if every_n_steps < 1:
            raise ValueError(f"SigtermCheck: every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.checks = 0
        """How many checks ran (for tests and benchmarks)."""
        self._patched: tuple[Any, Any] | None = None

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit" or self.every_n_steps == 1 or self._patched is not None:
            return
        loop = trainer.fit_loop.epoch_loop
        original = getattr(loop, "_broadcast_sigterm_tensor", None)
        if original is None:
            rank_zero_warn("SigtermCheck: this Lightning version has no per-step SIGTERM broadcast to thin out; "
                           "the callback does nothing")
            return
        calls = itertools.count()  # every rank calls it once per training batch: the same count on every rank

        def every_n() -> None:
            if next(calls) % self.every_n_steps == 0:
                self.checks += 1
                original()

        loop._broadcast_sigterm_tensor = every_n
        self._patched = (loop, original)

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._patched is not None:
            loop, original = self._patched
            loop._broadcast_sigterm_tensor = original
            self._patched = None
