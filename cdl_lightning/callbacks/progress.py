"""A rich progress bar that does not cost a device synchronisation per training step."""

from __future__ import annotations

from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import RichProgressBar
from typing_extensions import override

__all__ = ["ThrottledRichProgressBar"]


class ThrottledRichProgressBar(RichProgressBar):
    """Lightning's `RichProgressBar`, updated every ``update_every`` training batches instead of every batch.

    The stock bar reads the progress-bar metrics after every batch: each logged tensor is converted with ``.item()``,
    which waits for the GPU to finish the step, so the host cannot queue the next step while the GPU runs this one;
    in a terminal it also re-renders every batch. Here the bar (count and metrics) moves on the first batch, every
    ``update_every``-th batch and the last one; validation and the rest behave as in the stock bar.

    Args:
        update_every: training batches between updates (1 = the stock behaviour).
        **kwargs: `RichProgressBar` arguments (``refresh_rate``, ``leave``, ``theme``, ``console_kwargs``).
    """

    def __init__(self, update_every: int = 20, **kwargs: Any) -> None:
        if update_every < 1:
            raise ValueError(f"update_every must be >= 1, got {update_every}")
        super().__init__(**kwargs)
        self.update_every = update_every

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        done = batch_idx + 1
        total = self.total_train_batches
        if batch_idx == 0 or done % self.update_every == 0 or (isinstance(total, int) and done >= total):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
