"""A rich progress bar that does not cost a device synchronisation per training step."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import RichProgressBar
from torch import Tensor
from typing_extensions import override

__all__ = ["ThrottledRichProgressBar"]


class ThrottledRichProgressBar(RichProgressBar):
    """Lightning's `RichProgressBar`, updated every ``update_every`` training batches instead of every batch, and
    reading the metrics it shows only then.

    A metric logged with ``self.log(..., prog_bar=True)`` costs a device synchronisation at *every* training step,
    whatever the bar does: Lightning's logger connector converts each such tensor to a Python number with ``.item()``
    after every batch (``_ResultCollection.metrics``), which waits for the GPU to finish the step, so the host cannot
    queue the next step while the GPU runs this one (profiled on one H200 in a ViT-B CODA fit with
    `benchmarks/e2e.py --profile-steps`: that wait averaged 3.3 ms per step of 27 ms of GPU work, and the GPU
    idled 5.0 ms per step). The library's modules therefore log their training loss without ``prog_bar``; this bar
    shows the ``metrics`` named here from ``trainer.callback_metrics`` (device tensors, converted only when the bar
    is drawn) and the module's ``current_task`` (a Python int, if it has one). The bar (count and metrics) moves on
    the first batch, every ``update_every``-th batch and the last one; validation and the rest behave as in the
    stock bar. ``cdl fit`` adds it unless the config names another bar; in a `Trainer` of your own, pass it in
    ``callbacks`` to see the loss (Lightning's default bar shows only ``prog_bar`` metrics).

    Args:
        update_every: training batches between updates (1 = the stock behaviour).
        metrics: names of logged metrics to show, read at each update (those not logged are left out).
        **kwargs: `RichProgressBar` arguments (``refresh_rate``, ``leave``, ``theme``, ``console_kwargs``).
    """

    def __init__(self, update_every: int = 20, metrics: Sequence[str] = ("train/loss",), **kwargs: Any) -> None:
        if update_every < 1:
            raise ValueError(f"update_every must be >= 1, got {update_every}")
        super().__init__(**kwargs)
        self.update_every = update_every
        self.metrics = list(metrics)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        done = batch_idx + 1
        total = self.total_train_batches
        if batch_idx == 0 or done % self.update_every == 0 or (isinstance(total, int) and done >= total):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    @override
    def get_metrics(
        self, trainer: Trainer, pl_module: LightningModule
    ) -> dict[str, int | str | float | dict[str, float]]:
        items = super().get_metrics(trainer, pl_module)
        for name in self.metrics:
            value = trainer.callback_metrics.get(name)
            if isinstance(value, Tensor) and value.numel() == 1:
                items[name] = value.item()  # one synchronisation per bar update, not per step
        task = getattr(pl_module, "current_task", None)
        if isinstance(task, int) and not isinstance(task, bool):
            items["task"] = task
        return items
