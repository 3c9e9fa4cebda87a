"""Per-task snapshots in checkpoints, stored as the rows that changed since the previous task's snapshot.

A prompt learner records its trainable state at every task end (a distiller's teacher reads these snapshots), and
every checkpoint carries all of them: a ViT-B CODA-Prompt learner's trainable state is ~15 MB, so a tenth-task
checkpoint would hold ~150 MB of snapshots, written at every epoch end. Yet a task trains only its own rows (CODA's
components, keys and attention vectors of that task, the head rows of its classes): the rest of the state is bitwise
the same as in the previous snapshot. `pack_snapshots` stores the first snapshot whole and every later tensor as the
indices and values of the rows (vectors along the last dimension, `as_rows`) whose *bits* differ from the previous
snapshot's, or whole where a delta would not be smaller; `unpack_snapshots` rebuilds bitwise the same tensors. Pure
torch, no Lightning.

Checkpoint layout (``checkpoint["cdl"]``): ``"task_snapshot_rows"`` holds the packed list. Checkpoints written before
it hold the full list under ``"task_snapshots"``; `checkpoint_snapshots` reads either.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "PACKED_KEY", "PLAIN_KEY", "SnapshotPacker", "as_rows", "checkpoint_snapshots", "pack_snapshots",
    "unpack_snapshots",
]

PACKED_KEY = "task_snapshot_rows"
"""``checkpoint["cdl"]`` key of the packed snapshots (this module's format)."""

PLAIN_KEY = "task_snapshots"
"""``checkpoint["cdl"]`` key of the full snapshot list (the older format, still read)."""

Packed = dict[str, Any]
"""A packed tensor: ``{"full": tensor}`` or ``{"rows": int64 indices, "values": those rows}`` (relative to the
previous snapshot's tensor of the same name)."""


def as_rows(t: Tensor) -> Tensor:
    """``t`` as a matrix of rows: its vectors along the last dimension (``-1 x shape[-1]``; a 1-d tensor's
    elements are rows of one). CODA's stacked ``layers x pool x length x dim`` components thus change in the rows of
    the components a task trains, in every layer."""
    return t.reshape(-1, t.shape[-1] if t.dim() > 1 else 1)


_INTEGER_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def row_bits(t: Tensor) -> Tensor:
    """``t``'s rows (`as_rows`) with each element viewed as an integer of its size (bytes where there is none): two
    elements hold the same bits exactly when these integers are equal, and all-zero bits exactly when it is 0."""
    rows = as_rows(t.detach().contiguous())
    return rows.view(_INTEGER_OF_SIZE.get(t.element_size(), torch.uint8))


def select_rows(t: Tensor, rows: Tensor) -> Tensor | None:
    """A copy of the rows (`as_rows`) ``rows`` of ``t`` when those rows and their int64 indices take fewer bytes
    than ``t`` whole; ``None`` when storing ``t`` whole is smaller."""
    matrix = as_rows(t)
    row_bytes = matrix.shape[1] * t.element_size()
    if rows.numel() * (row_bytes + rows.element_size()) < t.numel() * t.element_size():
        return matrix.index_select(0, rows)
    return None


def changed_rows(previous: Tensor, current: Tensor) -> Tensor | None:
    """Indices of the rows (`as_rows`) of ``current`` whose bits differ from ``previous``'s; ``None`` when the two
    cannot be compared row by row (another shape or dtype, or a 0-d tensor). Bits, not values: ``-0.0`` vs ``0.0``
    counts as changed and a NaN that stayed the same NaN does not."""
    if previous.shape != current.shape or previous.dtype != current.dtype or current.dim() == 0:
        return None
    if current.numel() == 0:
        return torch.zeros(0, dtype=torch.long)
    return (row_bits(previous) != row_bits(current)).any(dim=1).nonzero().flatten()


def pack_tensor(previous: Tensor | None, current: Tensor) -> Packed:
    """``current`` as a delta against ``previous`` when that is smaller than the whole tensor, else whole."""
    rows = None if previous is None else changed_rows(previous, current)
    values = None if rows is None else select_rows(current, rows)
    return {"full": current} if values is None else {"rows": rows, "values": values}


def pack_snapshot(previous: Mapping[str, Tensor] | None, snapshot: Mapping[str, Tensor]) -> dict[str, Packed]:
    """One snapshot, each tensor packed against ``previous``'s tensor of the same name."""
    return {name: pack_tensor((previous or {}).get(name), tensor) for name, tensor in snapshot.items()}


def pack_snapshots(snapshots: Sequence[Mapping[str, Tensor]]) -> list[dict[str, Packed]]:
    """The snapshots, each tensor packed against the previous snapshot's tensor of the same name (see module doc)."""
    return [pack_snapshot(snapshots[i - 1] if i else None, snapshot) for i, snapshot in enumerate(snapshots)]


class SnapshotPacker:
    """`pack_snapshots` for a list that grows between calls (a learner's snapshots, packed at every checkpoint):
    a snapshot already packed against the same previous snapshot (the same objects: snapshots are never changed in
    place once recorded) is not compared again."""

    def __init__(self) -> None:
        self._done: list[tuple[object, object, dict[str, Packed]]] = []  # (previous, snapshot, packed), held alive

    def __call__(self, snapshots: Sequence[Mapping[str, Tensor]]) -> list[dict[str, Packed]]:
        done: list[tuple[object, object, dict[str, Packed]]] = []
        for i, snapshot in enumerate(snapshots):
            previous = snapshots[i - 1] if i else None
            cached = self._done[i] if i < len(self._done) else None
            if cached is not None and cached[0] is previous and cached[1] is snapshot:
                done.append(cached)
            else:
                done.append((previous, snapshot, pack_snapshot(previous, snapshot)))
        self._done = done
        return [packed for _, _, packed in done]


def unpack_snapshots(packed: Sequence[Mapping[str, Packed]]) -> list[dict[str, Tensor]]:
    """The full snapshots back from `pack_snapshots`' output (bitwise the tensors it was given).

    Raises:
        ValueError: the data does not have the packed layout (a corrupt or foreign checkpoint entry).
    """
    snapshots: list[dict[str, Tensor]] = []
    previous: dict[str, Tensor] = {}
    for task, entry in enumerate(packed):
        snapshot: dict[str, Tensor] = {}
        for name, item in entry.items():
            if "full" in item:
                snapshot[name] = item["full"]
                continue
            base = previous.get(name)
            rows, values = item.get("rows"), item.get("values")
            if base is None or rows is None or values is None:
                raise ValueError(f"packed task snapshot {task} stores {name!r} as changed rows, but "
                                 f"{'the previous snapshot has no such tensor' if base is None else 'its data is cut'}"
                                 ": the checkpoint is damaged; use an intact copy of it")
            snapshot[name] = as_rows(base).index_copy(0, rows, values).view(base.shape)
        snapshots.append(snapshot)
        previous = snapshot
    return snapshots


def checkpoint_snapshots(cdl: Mapping[str, Any]) -> list[dict[str, Tensor]]:
    """The full per-task snapshots of a checkpoint's ``cdl`` entry, packed (this format) or plain (older files)."""
    if PACKED_KEY in cdl:
        return unpack_snapshots(cdl[PACKED_KEY])
    return list(cdl.get(PLAIN_KEY, []))
