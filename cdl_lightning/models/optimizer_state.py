"""Optimizer state in checkpoints, stored as the indices and values of its nonzero rows.

A prompt learner clears Adam's state at every task start, and a task trains only its own rows of the stacked prompt
tensors (CODA's components, keys and attention vectors of that task, the head rows of its classes): every other row
gets an exactly-zero gradient, so (with weight decay 0) its ``exp_avg`` / ``exp_avg_sq`` rows stay exactly zero. Yet
Lightning saves the whole moments at every epoch: a ViT-B CODA learner's checkpoint spends ~31 MB on them.
`pack_optimizer_states` stores each state tensor as the indices and values of its rows (vectors along the last
dimension, `as_rows`) that hold a nonzero *bit* (``-0.0`` is kept), wherever that is smaller than the whole tensor;
scalars (Adam's ``step``), tensors under `MIN_PACKED_BYTES` and tensors of another kind (sparse, subclasses such as
``DTensor``) stay as they are. `unpack_optimizer_states` rebuilds bitwise the same tensors. Pure torch, no Lightning.

Neither function changes its input: ``Optimizer.state_dict()`` returns the optimizer's live per-parameter dicts, so
both build new dicts (and new tensors where they pack or unpack; the rest are the same objects).

Checkpoint layout: the packed ``checkpoint["optimizer_states"]``, marked by ``checkpoint["cdl"][PACKED_KEY]`` (True).
Checkpoints written before hold the plain states and no such key; they load unchanged.

Measured on a CPU (2 threads of an AMD EPYC, torch 2.14.1; ``benchmarks/checkpoint_size.py``): a ViT-B/16
CODA-Prompt learner (pool 100, length 8, layers 0-4, 10 tasks of 10 classes, random weights) after three Adam steps on
a fake batch of task 9 holds 31.3 MB of Adam state, packed 3.1 MB (a tenth: the task's own rows, plus their indices);
a checkpoint-like dict (trainable state, Adam's state, packed snapshots) shrank from 75.0 to 46.8 MB on disk (task 5:
68.8 -> 40.7 MB; task 0: 47.0 -> 18.8 MB), its ``torch.save`` from 72-83 ms to 44-58 ms with the ~7 ms of packing
included (medians of three runs of 9-15 saves each), and ``torch.load`` plus unpacking took as long as loading the
plain file (14-20 ms).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from cdl_lightning.models.snapshots import row_bits, select_rows

__all__ = [
    "MIN_PACKED_BYTES", "PACKED_KEY", "nonzero_rows", "pack_optimizer_states", "pack_state_tensor",
    "unpack_optimizer_states", "unpack_state_tensor",
]

PACKED_KEY = "optimizer_state_rows"
"""``checkpoint["cdl"]`` key, ``True`` when the checkpoint's ``optimizer_states`` are packed (this module's format)."""

MIN_PACKED_BYTES = 4096
"""State tensors smaller than this many bytes are stored whole (a bias's moments: not worth the indices)."""

_ROWS, _VALUES, _SHAPE = "nonzero_rows", "values", "shape"


def _packable(value: Any, min_bytes: int) -> bool:
    return (type(value) is Tensor and value.layout == torch.strided and value.dim() > 0
            and value.numel() * value.element_size() >= min_bytes)


def nonzero_rows(t: Tensor) -> Tensor:
    """Indices of the rows (`as_rows`) of ``t`` with any nonzero bit: ``-0.0`` counts as nonzero, ``0.0`` does not."""
    return row_bits(t).ne(0).any(dim=1).nonzero().flatten()


def pack_state_tensor(t: Any, min_bytes: int = MIN_PACKED_BYTES) -> Any:
    """``t`` as ``{"nonzero_rows": int64 indices, "values": those rows, "shape": [sizes]}`` when that is smaller than
    ``t``; else ``t`` itself (a scalar, a small tensor, a mostly nonzero one, or not a plain strided tensor)."""
    if not _packable(t, min_bytes):
        return t
    rows = nonzero_rows(t)
    values = select_rows(t, rows)  # a copy: the packed values are new tensors, never views of the live state
    return t if values is None else {_ROWS: rows, _VALUES: values, _SHAPE: list(t.shape)}


def _is_packed(item: Any) -> bool:
    return isinstance(item, Mapping) and set(item) == {_ROWS, _VALUES, _SHAPE}


def unpack_state_tensor(item: Any) -> Any:
    """The tensor `pack_state_tensor` packed (bitwise, contiguous, on the values' device); anything else as it is.

    Raises:
        ValueError: the packed entry's indices, values and shape do not fit together (a damaged checkpoint).
    """
    if not _is_packed(item):
        return item
    rows, values, shape = item[_ROWS], item[_VALUES], [int(size) for size in item[_SHAPE]]
    width = shape[-1] if len(shape) > 1 else 1
    height = math.prod(shape) // width if width else 0
    fits = (isinstance(rows, Tensor) and isinstance(values, Tensor) and rows.dim() == 1 and width > 0
            and tuple(values.shape) == (rows.numel(), width))
    if fits and rows.numel():
        fits = 0 <= int(rows.min()) and int(rows.max()) < height
    if not fits:
        raise ValueError(f"a packed optimizer state tensor of shape {shape} does not fit its rows/values: the "
                         "checkpoint is damaged; use an intact copy of it")
    full = values.new_zeros(height, width)
    return full.index_copy_(0, rows.to(device=values.device, dtype=torch.long), values).view(shape)


def _map_state(state_dict: Mapping[str, Any], convert: Callable[[Any], Any]) -> dict[str, Any]:
    """A new optimizer state dict with ``convert`` applied to every per-parameter value (new per-parameter dicts;
    ``param_groups`` and other entries are shared, not copied: neither function changes them)."""
    out = dict(state_dict)
    if "state" in state_dict:
        out["state"] = {index: {name: convert(value) for name, value in per_param.items()}
                        if isinstance(per_param, Mapping) else per_param
                        for index, per_param in state_dict["state"].items()}
    return out


def pack_optimizer_states(states: Sequence[Mapping[str, Any]], min_bytes: int = MIN_PACKED_BYTES) -> list[dict]:
    """A checkpoint's ``optimizer_states`` (one ``Optimizer.state_dict()`` per optimizer) with every state tensor
    packed by `pack_state_tensor`; the input is left unchanged."""
    return [_map_state(state, lambda t: pack_state_tensor(t, min_bytes)) for state in states]


def unpack_optimizer_states(states: Sequence[Mapping[str, Any]]) -> list[dict]:
    """The ``optimizer_states`` `pack_optimizer_states` was given, bitwise (new dicts; the input is unchanged).

    Raises:
        ValueError: a packed entry is damaged.
    """
    return [_map_state(state, unpack_state_tensor) for state in states]
