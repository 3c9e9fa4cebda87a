"""Reading ``(logits or preds, targets, task_ids)`` out of whatever a ``validation_step`` returns.

Part of `ContinualEvaluation`; pure (tensors and containers only, no Lightning).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import Tensor

__all__ = ["OutputAdapter", "StepOutputParser"]

OutputAdapter = Callable[[Any, Any], tuple[Tensor, Tensor, Tensor]]
"""``(validation_step outputs, batch) -> (logits or preds, targets, task_ids)``."""


class StepOutputParser:
    """Turn ``(outputs, batch)`` of a validation step into ``(logits or preds, targets, task_ids)``.

    Accepted, unless ``adapter`` is given: a tuple/list ``(logits, targets, task_ids)``; a dict with keys
    ``logits_key`` (or ``"preds"``), ``targets_key`` and ``task_ids_key`` (missing targets / task ids are read from a
    ``(inputs, targets, task_ids)`` batch); the logits tensor alone with such a batch.

    Args:
        adapter: replaces the parsing above.
        logits_key: dict key of the logits.
        targets_key: dict key of the targets.
        task_ids_key: dict key of the task ids.
    """

    def __init__(
        self,
        adapter: OutputAdapter | None = None,
        logits_key: str = "logits",
        targets_key: str = "targets",
        task_ids_key: str = "task_ids",
    ) -> None:
        self.adapter = adapter
        self.logits_key, self.targets_key, self.task_ids_key = logits_key, targets_key, task_ids_key

    def __call__(self, outputs: Any, batch: Any) -> tuple[Tensor, Tensor, Tensor]:
        if self.adapter is not None:
            return self.adapter(outputs, batch)
        from_batch = isinstance(batch, Sequence) and len(batch) == 3
        if isinstance(outputs, Tensor) and from_batch:
            return outputs, batch[1], batch[2]
        if isinstance(outputs, Mapping):
            logits = outputs.get(self.logits_key, outputs.get("preds"))
            targets = outputs.get(self.targets_key, batch[1] if from_batch else None)
            task_ids = outputs.get(self.task_ids_key, batch[2] if from_batch else None)
            if logits is not None and targets is not None and task_ids is not None:
                return logits, targets, task_ids
        if isinstance(outputs, Sequence) and len(outputs) == 3 and all(isinstance(o, Tensor) for o in outputs):
            return outputs[0], outputs[1], outputs[2]
        raise TypeError(
            "ContinualEvaluation could not read the output of `validation_step`. Return `(logits, targets, "
            f"task_ids)`, or a dict with keys '{self.logits_key}' (or 'preds'), '{self.targets_key}', "
            f"'{self.task_ids_key}', or pass `output_adapter=`. Got {type(outputs).__name__}."
        )
