"""`RNGStateCallback`: random generator states in checkpoints, for an exact resume."""

from __future__ import annotations

import random
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

__all__ = ["RNGStateCallback", "capture_rng_state", "restore_rng_state"]


def capture_rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """States of Python's ``random``, numpy's global generator, torch's CPU generator and (if ``device`` is a CUDA
    device) that device's generator, as objects ``torch.load(weights_only=True)`` accepts (lists, ints, uint8
    tensors)."""
    version, mt_state, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {"version": version, "state": list(mt_state), "gauss": gauss},
        "numpy": {
            "name": str(np_name),
            "keys": [int(k) for k in np_keys],
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    """Inverse of `capture_rng_state` (the CUDA state goes to ``device`` when both exist)."""
    if "python" in state:
        py = state["python"]
        random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    if "numpy" in state:
        npy = state["numpy"]
        keys = np.asarray(npy["keys"], dtype=np.uint32)
        np.random.set_state((npy["name"], keys, npy["pos"], npy["has_gauss"], npy["gauss"]))
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and device is not None and device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


class RNGStateCallback(Callback):
    """Save the random generator states in every checkpoint and restore them on resume.

    Lightning does not checkpoint RNG states, so a resumed run draws different augmentations (and dropout masks)
    than the uninterrupted run. This callback captures, when a checkpoint is written (``state_dict`` is called by the
    checkpoint dump), the states of Python ``random``, numpy's global generator, torch's CPU generator and the CUDA
    generator of the trainer's root device. On resume, ``load_state_dict`` restores them immediately and again at
    ``on_train_start``, so that whatever runs between restoring the checkpoint and the first resumed batch (sanity
    check, dataloader setup) does not shift the streams. numpy's state is stored as plain ints/lists so checkpoints
    load with ``torch.load(weights_only=True)``.

    Under DDP the checkpoint holds rank 0's states and every rank restores them. Dataloader shuffling does not use
    these generators (`cdl_lightning.data.ContinualDataModule` seeds its own), device-side augmentation does.
    """

    def __init__(self) -> None:
        self._device: torch.device | None = None
        self._pending: dict[str, Any] | None = None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._device = trainer.strategy.root_device

    @override
    def state_dict(self) -> dict[str, Any]:
        return capture_rng_state(self._device)

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict
        restore_rng_state(state_dict, self._device)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._pending is not None:
            restore_rng_state(self._pending, trainer.strategy.root_device)
            self._pending = None
