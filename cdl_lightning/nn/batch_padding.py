"""`BatchPadding`: run a compiled pass only at batch sizes it has compiled for, a smaller batch padded up.

A ``torch.compile``d pass with static shapes compiles once per input shape. A continual run meets many batch sizes:
the full batch, each epoch's smaller last batch and, since evaluation covers every task seen so far, one more
remainder per task. Compiling each is slow, and dynamo's default answer (after the first change, recompile for a
symbolic batch size) leaves every later batch on slower dynamic-shape code. Padding a smaller batch with zero rows to
a size already compiled costs only that batch's extra rows and keeps one static compile per full batch size.

Only for passes whose samples do not interact (a ViT: attention and every op mix tokens within a sample, never across
samples), so the real rows' outputs are those of the unpadded batch up to the rounding of differently-sized kernels.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["BatchPadding"]


class BatchPadding:
    """Call ``fn`` with the batch padded to the smallest batch size it already ran at that is at least this one's.

    A batch of ``b`` samples runs as is when ``b`` is a size ``fn`` has run at, or when no such size is as large (``b``
    then becomes one of ``sizes``: a new compile). Otherwise every tensor among the arguments whose first dimension is
    ``b`` (nested in dicts, lists, tuples) gets zero rows appended up to that size, and every tensor of the result whose
    first dimension is the padded size (nested likewise, dataclasses such as `cdl_lightning.nn.vit.ViTOutput` too) is
    cut back to its first ``b`` rows. Tensors broadcast over the batch (first dimension 1) are left alone; with ``b ==
    1`` they are padded too, which leaves the real row's inputs unchanged. Autograd flows through the padding into the
    real rows only.

    Args:
        fn: the pass, called as ``fn(*args, **kwargs)``; the batch size is the first dimension of the first tensor
            argument.

    Attributes:
        sizes: the batch sizes ``fn`` has run at.
        padded_calls: calls that ran padded.
    """

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.sizes: set[int] = set()
        self.padded_calls = 0
        self._strides: dict[int, list[tuple[int, ...]]] = {}  # per size: its first call's batched arguments' strides

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        batch = _batch_size(args, kwargs)
        if batch is None or batch in self.sizes:
            return self.fn(*args, **kwargs)
        larger = [size for size in self.sizes if size > batch]
        if not larger:
            self.sizes.add(batch)
            self._strides[batch] = _batched_strides((args, kwargs), batch)
            return self.fn(*args, **kwargs)
        size = min(larger)
        self.padded_calls += 1
        strides = iter(self._strides[size])
        args, kwargs = _map_tensors(
            (args, kwargs), lambda t: _pad(t, batch, size, next(strides, None)) if _batched(t, batch) else t)
        return _map_tensors(self.fn(*args, **kwargs), lambda t: t[:batch] if _batched(t, size) else t)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.fn!r}, sizes={sorted(self.sizes)})"


def _pad(tensor: Tensor, batch: int, size: int, stride: tuple[int, ...] | None) -> Tensor:
    """``tensor`` (``batch`` rows) with zero rows up to ``size``, laid out in ``stride`` (those of the matching argument
    of the pass's first call at ``size``; a compiled pass guards on strides, and a batch of 1 may report another stride
    for its batch dimension) or else in its own strides, where they do not overlap."""
    shape = (size, *tensor.shape[1:])
    if batch and tensor.stride(0) == 0:  # one row broadcast over the batch: broadcast it further
        return tensor[:1].expand(shape)
    for layout in (stride, tensor.stride()):
        if layout is not None and len(layout) == len(shape) and _non_overlapping(shape, layout):
            out = torch.empty_strided(shape, layout, dtype=tensor.dtype, device=tensor.device)
            out[batch:].zero_()
            out[:batch].copy_(tensor)  # differentiable: the real rows' gradients flow back into ``tensor``
            return out
    return torch.cat([tensor, tensor.new_zeros((size - batch, *tensor.shape[1:]))])


def _batched_strides(tree: Any, batch: int) -> list[tuple[int, ...]]:
    """The strides of the tensors in ``tree`` whose first dimension is ``batch``, in `_map_tensors` order."""
    strides: list[tuple[int, ...]] = []
    _map_tensors(tree, lambda t: strides.append(t.stride()) if _batched(t, batch) else None)
    return strides


def _batched(tensor: Tensor, batch: int) -> bool:
    return tensor.dim() > 0 and tensor.shape[0] == batch


def _non_overlapping(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    """No two elements of a ``shape`` tensor with ``stride`` share memory (each stride, in increasing order, spans the
    extent of the dimensions below it)."""
    extent = 1
    for length, step in sorted(((n, st) for n, st in zip(shape, stride, strict=True) if n > 1), key=lambda d: d[1]):
        if step < extent:
            return False
        extent = step * length
    return True


def _batch_size(args: tuple, kwargs: dict) -> int | None:
    if args and isinstance(args[0], Tensor) and args[0].dim():
        return args[0].shape[0]
    found: list[int] = []
    _map_tensors((args, kwargs), lambda t: found.append(t.shape[0]) if t.dim() and not found else None)  # the first
    return found[0] if found else None


def _map_tensors(tree: Any, fn: Callable[[Tensor], Any]) -> Any:
    """``tree`` with ``fn`` applied to every tensor in it (dicts, lists, tuples, dataclass instances)."""
    if isinstance(tree, Tensor):
        out = fn(tree)
        return tree if out is None else out
    if isinstance(tree, dict):
        return {key: _map_tensors(value, fn) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        items = [_map_tensors(value, fn) for value in tree]
        return type(tree)(*items) if hasattr(tree, "_fields") else type(tree)(items)
    if dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        return dataclasses.replace(tree, **{f.name: _map_tensors(getattr(tree, f.name), fn)
                                           for f in dataclasses.fields(tree) if f.init})
    return tree
