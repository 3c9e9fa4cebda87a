"""`BatchPadding`: run a compiled pass only at batch sizes it has compiled for, a smaller batch padded up.

A ``torch.compile``d pass with static shapes compiles once per input shape. A continual run meets many batch sizes:
the full batch, each epoch's smaller last batch and, since evaluation covers every task seen so far, one more
remainder per task. Compiling each is slow, and dynamo's default answer (after the first change, recompile for a
symbolic batch size) leaves every later batch on slower dynamic-shape code. Padding a remainder with zero rows to a
full batch size costs only that batch's extra rows and keeps one static compile per full batch size.

Only for passes whose samples do not interact (a ViT: attention and every op mix tokens within a sample, never across
samples), so the real rows' outputs are those of the unpadded batch up to the rounding of differently-sized kernels.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

__all__ = ["BatchPadding"]

Layout = list[tuple[bool, tuple[int, ...]]]
"""Per argument tensor, in `_map_tensors` order: (holds the batch, its strides)."""


class BatchPadding:
    """Call ``fn`` with the batch padded to the smallest known batch size that is at least this one's.

    Known sizes: those given, and each size ``fn`` ran at unpadded. A batch of ``b`` samples runs as is when ``b`` is
    known or larger than every known size (``b`` then becomes known: for a compiled pass, a new compile). Otherwise it
    runs padded: the tensors among the arguments that hold the batch (nested in dicts, lists, tuples) get zero rows
    appended up to that size, and every tensor of the result whose first dimension is that size (nested likewise,
    dataclasses such as `cdl_lightning.nn.vit.ViTOutput` too) is cut back to its first ``b`` rows. Which arguments hold
    the batch, and in which strides, is copied from the first unpadded call at that size (a compiled pass guards on
    shapes and strides), so a tensor broadcast over the batch there (first dimension 1) stays as it is, also when
    ``b == 1``; before such a call, every tensor whose first dimension is ``b`` is padded. Autograd flows through the
    padding into the real rows only. The result must hold per-sample rows only: a value reduced over the batch (a sum,
    a mean) would include the padded rows.

    Args:
        fn: the pass, called as ``fn(*args, **kwargs)``; the batch size is the first dimension of the first tensor
            argument.
        sizes: batch sizes known up front (a data module's training and evaluation batch sizes), so that a full batch
            smaller than another (an evaluation batch size below the training one) runs as itself, not padded.

    Attributes:
        sizes: the known batch sizes.
        padded_calls: calls that ran padded.
    """

    def __init__(self, fn: Callable[..., Any], sizes: Iterable[int] = ()) -> None:
        self.fn = fn
        self.sizes: set[int] = {int(size) for size in sizes if size > 0}
        self.padded_calls = 0
        self._layouts: dict[int, Layout] = {}  # per size, of its first unpadded call

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        batch = _batch_size(args, kwargs)
        if not batch or batch in self._layouts:  # no batched tensor, an empty batch, or a size run before (the rule)
            return self.fn(*args, **kwargs)
        size = min((known for known in self.sizes if known > batch), default=None)
        if batch in self.sizes or size is None:  # a known size's first call, or larger than every known size
            self.sizes.add(batch)
            self._layouts[batch] = _layout((args, kwargs), batch)
            return self.fn(*args, **kwargs)
        self.padded_calls += 1
        args, kwargs = _pad_tree((args, kwargs), batch, size, self._layouts.get(size))
        return _map_tensors(self.fn(*args, **kwargs), lambda t: t[:batch] if _batched(t, size) else t)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.fn!r}, sizes={sorted(self.sizes)})"


def _layout(tree: Any, batch: int) -> Layout:
    layout: Layout = []
    _map_tensors(tree, lambda t: layout.append((_batched(t, batch), t.stride())))
    return layout


def _pad_tree(tree: Any, batch: int, size: int, layout: Layout | None) -> Any:
    """``tree`` with its batch-holding tensors padded from ``batch`` to ``size`` rows: those that held the batch in
    ``layout``, where the tree has as many tensors, else those whose first dimension is ``batch``."""
    if layout is not None and len(_layout(tree, batch)) != len(layout):
        layout = None
    position = 0

    def pad(tensor: Tensor) -> Tensor:
        nonlocal position
        held, stride = layout[position] if layout is not None else (True, None)
        position += 1
        return _pad(tensor, batch, size, stride) if held and _batched(tensor, batch) else tensor

    return _map_tensors(tree, pad)


def _pad(tensor: Tensor, batch: int, size: int, stride: tuple[int, ...] | None) -> Tensor:
    """``tensor`` (``batch`` rows) with zero rows up to ``size``, laid out in ``stride`` (the same argument's in the
    first call at ``size``: a batch of 1 may report another stride for its batch dimension) or else in its own
    strides, where they do not overlap."""
    shape = (size, *tensor.shape[1:])
    if tensor.stride(0) == 0 or (batch == 1 and stride is not None and stride[0] == 0):
        return tensor[:1].expand(shape)  # one row broadcast over the batch (in the first call too): broadcast it
    for layout in (stride, tensor.stride()):
        if layout is not None and len(layout) == len(shape) and _non_overlapping(shape, layout):
            out = torch.empty_strided(shape, layout, dtype=tensor.dtype, device=tensor.device)
            out[batch:].zero_()
            out[:batch].copy_(tensor)  # differentiable: the real rows' gradients flow back into ``tensor``
            return out
    return torch.cat([tensor, tensor.new_zeros((size - batch, *tensor.shape[1:]))])


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
    """The first dimension of the first tensor argument (``None`` without one)."""
    if args and isinstance(args[0], Tensor) and args[0].dim():
        return args[0].shape[0]
    found: list[int] = []
    _map_tensors((args, kwargs), lambda t: found.append(t.shape[0]) if t.dim() and not found else None)
    return found[0] if found else None


def _map_tensors(tree: Any, fn: Callable[[Tensor], Any]) -> Any:
    """``tree`` with ``fn`` applied to every tensor in it (dicts, lists, tuples, dataclass instances); a tensor for
    which ``fn`` returns ``None`` stays."""
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
