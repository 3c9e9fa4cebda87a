"""CUDA graphs for the frozen, gradient-free passes of a training step (query passes, the teacher, inference).

A prompt learner's step at batch 64 is bound by the CPU on a modern GPU: every ViT pass launches hundreds of small
kernels, and launching them takes longer than running them. A CUDA graph (``torch.cuda.CUDAGraph``) records a pass's
kernels once and replays them with one launch. That is only valid for passes whose kernels and memory addresses do not
change between calls, which is what the frozen passes are: fixed weights (updated in place when a teacher switches
task snapshot), no autograd, no host synchronisation, no randomness but draws from the device's default CUDA
generator (a batch's augmentation: PyTorch registers that generator with every graph it captures, in newer releases
with every graph that draws from it, and a replay draws what the eager call it replaces would have drawn).

`GraphedFunction` wraps such a pass: per input signature (shapes, dtypes, autocast and inference-mode state, plus the
static keyword arguments such as the task) it captures a graph on first use and afterwards copies the inputs into the
graph's static buffers, replays, and returns clones of the static outputs (so a later replay can never overwrite what a
caller holds). If the parameters a graph reads were re-allocated (``.to()``, ``load_state_dict(assign=True)``), the
graph is re-captured; if capture fails (an operation that cannot be captured), the pass runs eagerly from then on,
with a warning. Off CUDA, and when autograd records, it simply calls the function.
"""

from __future__ import annotations

import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from cdl_lightning.nn.prompts.base import PromptOutput
from cdl_lightning.nn.vit import Prefix, ViTOutput

Outputs = tuple[Tensor, ...]


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: tuple[Tensor, ...]
    outputs: Outputs
    stream: torch.cuda.Stream  # its warm-up and capture stream (`private_stream`)


def _signature(tensors: Sequence[Tensor]) -> tuple:
    return tuple((tuple(t.shape), t.dtype, t.device, t.stride()) for t in tensors)


def _autocast_state(device_type: str) -> tuple:
    if not torch.is_autocast_enabled(device_type):
        return (False,)
    return True, torch.get_autocast_dtype(device_type)


def _capture_autocast() -> torch.autocast:
    """The caller's CUDA autocast state with the cast cache off: cached casts would be allocated inside a graph's
    private pool (and `torch.cuda.make_graphed_callables` refuses the cache)."""
    autocast = _autocast_state("cuda")
    dtype = autocast[1] if autocast[0] else torch.get_autocast_dtype("cuda")
    return torch.autocast("cuda", dtype=dtype, enabled=autocast[0], cache_enabled=False)


_held_streams: dict[tuple[int | None, int], int] = {}
"""Streams of `private_stream` held by live graphs (and `FastPaths`' second streams): (device index, CUDA stream
handle) -> holders alive."""


def private_stream(device: torch.device) -> torch.cuda.Stream:
    """A CUDA stream of ``device`` whose cuBLAS workspace no other live graph uses: for one graph's warm-up and
    capture (`GraphedFunction`), or for `FastPaths.aside`'s second stream.

    cuBLAS(Lt) keeps a workspace per (handle, stream), a graph replays with the one of its capture stream, and (torch
    2.14.1, ``CUDAGraph::reset``, also run when a graph is garbage-collected) destroying a graph frees the workspaces of
    its capture stream, whichever other graph still replays with them (pytorch/pytorch#193402). So every graph gets a
    stream of its own, and two passes that run at the same time must come from different streams. The streams come
    from the high-priority pool: ``torch.cuda.Stream()`` hands out the 32 streams of the default-priority pool
    round-robin, and other code draws from it all the time (`torch.cuda.make_graphed_callables` captures on a fresh
    pool stream per call in torch 2.14.1, on `torch.cuda.graph`'s default capture stream, also from that pool, in older
    releases), so a stream drawn there is "new" for only 32 draws. Within the high-priority pool, the streams held by
    live graphs are skipped while another is free (`hold_stream`). PyTorch instantiates graphs with
    ``cudaGraphInstantiateFlagUseNodePriority``: a graph's kernels keep this stream's (higher) priority on replay."""
    for _ in range(32):  # the streams of one pool
        stream = torch.cuda.Stream(device=device, priority=-1)
        if (stream.device.index, stream.cuda_stream) not in _held_streams:
            break
    else:
        warnings.warn("all 32 high-priority CUDA streams are held by live CUDA graphs: a new graph shares one (and its "
                      "cuBLAS workspace); drop models no longer used, or their graphs (`FastPaths.reset`)",
                      stacklevel=3)
    return stream


def hold_stream(stream: torch.cuda.Stream, holder: object) -> None:
    """Keep `private_stream` from handing ``stream`` out again while ``holder`` is alive."""
    key = (stream.device.index, stream.cuda_stream)
    _held_streams[key] = _held_streams.get(key, 0) + 1
    weakref.finalize(holder, _release_stream, key)


def _release_stream(key: tuple[int | None, int]) -> None:
    holders = _held_streams.pop(key, 1) - 1
    if holders > 0:
        _held_streams[key] = holders


class _GraphCache:
    """What both graph wrappers share: captured graphs keyed by input signature, least recently used out first,
    re-captured when the storage of the modules they read moved, and switched off for good after a failed capture.
    A signature is captured on its ``capture_after``-th call; the calls before run eagerly (the same kernels, so the
    same numbers): a signature met once, such as the last, smaller batch of a one-epoch task, costs no capture."""

    retire_dropped = False
    """Keep the graphs this cache drops (evicted, replaced by a re-capture, or dropped by a failed capture) alive in
    ``retired`` until `reset` instead of destroying them at once (see `_GraphedAutogradPass`)."""

    def __init__(self, modules: Sequence[nn.Module], max_graphs: int, warmup: int, capture_after: int = 2) -> None:
        if max_graphs < 1:
            raise ValueError(f"max_graphs must be >= 1, got {max_graphs}")
        if capture_after < 1:
            raise ValueError(f"capture_after must be >= 1, got {capture_after}")
        self.modules = list(modules)
        self.max_graphs = max_graphs
        self.warmup = warmup
        self.capture_after = capture_after
        self.calls: dict[Hashable, int] = {}
        self.graphs: OrderedDict[Hashable, tuple[object, tuple[int, ...]]] = OrderedDict()
        self.retired: list[object] = []
        self.disabled_reason: str | None = None
        self.captures = 0
        self.replays = 0

    def reset(self) -> None:
        """Drop every captured graph (and its memory)."""
        self.graphs.clear()
        self.retired.clear()

    def _drop(self, entry: tuple[object, tuple[int, ...]]) -> None:
        if self.retire_dropped:
            self.retired.append(entry[0])

    def _storage(self) -> tuple[int, ...]:
        return tuple(t.data_ptr() for m in self.modules for t in (*m.parameters(), *m.buffers()))

    def _lookup(self, key: Hashable, capture: Callable[[], object | None]) -> object | None:
        """The graph for ``key``, captured by ``capture()`` if missing or stale; ``None`` (run eagerly) before the
        key's ``capture_after``-th call or if capture failed."""
        self.calls[key] = self.calls.get(key, 0) + 1
        storage = self._storage()
        entry = self.graphs.get(key)
        if entry is None or entry[1] != storage:
            if self.calls[key] < self.capture_after:
                return None  # not (yet) worth a capture: the caller runs this call eagerly
            graph = capture()
            if graph is None:
                return None
            self.captures += 1
            if entry is not None:
                self._drop(entry)  # stale: the modules' storage moved
            entry = self.graphs[key] = (graph, storage)
            while len(self.graphs) > self.max_graphs:
                self._drop(self.graphs.popitem(last=False)[1])
        self.graphs.move_to_end(key)
        self.replays += 1
        return entry[0]

    def _disable(self, err: Exception, what: str) -> None:
        self.disabled_reason = f"{type(err).__name__}: {err}"
        for entry in self.graphs.values():
            self._drop(entry)
        self.graphs.clear()
        warnings.warn(f"CUDA graph capture of {what} failed, it runs eagerly ({self.disabled_reason})", stacklevel=4)


class GraphedFunction(_GraphCache):
    """Replay ``fn(*tensors, **static) -> tuple of tensors`` from CUDA graphs, one per input signature.

    Args:
        fn: a pure function of its tensor arguments, its hashable keyword arguments (``static``: each value gets its
            own graph) and the parameters/buffers of ``modules``: no autograd, no host synchronisation (``.item()``,
            data-dependent shapes), random numbers only from the device's default CUDA generator (``torch.rand(...,
            device=...)``: the warm-up's draws are undone before capture, and each replay advances the generator as
            one eager call does, so a replay draws the same numbers as the eager call it replaces). It returns a tuple
            of tensors.
        modules: the modules whose parameters and buffers ``fn`` reads; a graph is re-captured when their storage
            moved (e.g. after ``.to(device)``).
        max_graphs: graphs kept (least recently used first out); each holds its own memory pool.
        warmup: eager calls on a side stream before capture (lazy initialisation, cuBLAS workspaces, compilation).
            They and the eager calls before a signature's capture run under the capture's autocast state (the
            caller's, its cast cache off), so a ``torch.compile``d ``fn`` compiles (and recompiles, e.g. for a new
            batch size) in them, never under capture.
        capture_after: a signature is captured on its ``capture_after``-th call (the earlier ones run eagerly).
    """

    def __init__(
        self,
        fn: Callable[..., Outputs],
        modules: Sequence[nn.Module] = (),
        max_graphs: int = 4,
        warmup: int = 2,
        capture_after: int = 2,
    ) -> None:
        super().__init__(modules, max_graphs, warmup, capture_after)
        self.fn = fn

    def usable(self, tensors: Sequence[Tensor]) -> bool:
        """Whether this call can run from a graph (CUDA inputs, autograd not recording, graphs not disabled)."""
        return (
            self.disabled_reason is None
            and len(tensors) > 0
            and all(t.is_cuda for t in tensors)
            and not torch.is_grad_enabled()
            and not torch.cuda.is_current_stream_capturing()
        )

    def __call__(self, *tensors: Tensor, **static: Hashable) -> Outputs:
        if not self.usable(tensors):
            return self.fn(*tensors, **static)
        key = tuple(sorted(static.items()))
        signature = (key, _signature(tensors), _autocast_state("cuda"), torch.is_inference_mode_enabled())
        entry = self._lookup(signature, lambda: self._capture(tensors, static))
        if entry is None:  # before capture: eager, returned in the layout of a replay's clones (a view such as the
            # CLS token of an eager pass is strided; its clone is not), so that a graphed pass downstream keyed by its
            # inputs' strides sees the same signature on every call; under the capture's autocast state (the same
            # numbers: only trainable leaves' casts are cached), so that a `torch.compile`d ``fn`` compiles here, in
            # the state its capture will run in (torch.compile guards on autocast's cache flag too)
            with _capture_autocast():
                return tuple(out.clone() for out in self.fn(*tensors, **static))
        for buffer, tensor in zip(entry.inputs, tensors, strict=True):
            buffer.copy_(tensor)
        entry.graph.replay()
        return tuple(out.clone() for out in entry.outputs)

    def _capture(self, tensors: Sequence[Tensor], static: dict[str, Hashable]) -> _Graph | None:
        inputs = tuple(t.clone() for t in tensors)
        device = inputs[0].device
        rng = torch.cuda.get_rng_state(device)
        caller, capturing = torch.cuda.current_stream(device), False
        try:
            # this graph's own stream, for the capture too: cuBLAS keeps a workspace per stream and a graph replays
            # with the address it captured, so graphs captured on one shared stream (`torch.cuda.graph`'s default)
            # share a workspace: replayed concurrently (`FastPaths.aside`) they corrupted each other's results, and
            # destroying one (an evicted or re-captured graph) frees the workspace the others use (`private_stream`)
            side = private_stream(device)
            side.wait_stream(caller)
            # the warm-up calls must not consume random numbers of the run: the generator is put back before capture
            # (in place: the graph reads its seed and offset at every replay) and after it (capture draws nothing).
            # They run under the capture's autocast state: a `torch.compile`d ``fn`` whose guards held for them runs
            # the same compiled code under capture (compiling there fails: "cannot JIT compile during CUDA graph
            # capture" in torch 2.14.1)
            with torch.cuda.stream(side), _capture_autocast():
                for _ in range(self.warmup):
                    self.fn(*inputs, **static)
            caller.wait_stream(side)
            torch.cuda.set_rng_state(rng, device)
            graph, capturing = torch.cuda.CUDAGraph(), True
            with torch.cuda.graph(graph, stream=side), _capture_autocast():
                outputs = self.fn(*inputs, **static)
            torch.cuda.set_rng_state(rng, device)
            # torch 2.11 (``CUDAGraph::capture_begin`` -> ``CUDAGeneratorState::capture_prologue``) fills the default
            # generator's seed and offset tensors, which every graph that draws reads, on the capture stream before
            # capture: order those fills before any later replay's own (``replay_prologue``, on the replaying stream)
            caller.wait_stream(side)
        except Exception as err:  # an operation that cannot be captured: run this pass eagerly from now on
            if capturing:
                _recover_from_failed_capture(caller, side)
            torch.cuda.set_rng_state(rng, device)
            self._disable(err, "a gradient-free pass")
            return None
        if not isinstance(outputs, tuple) or not all(isinstance(t, Tensor) for t in outputs):
            raise TypeError(f"a graphed function must return a tuple of tensors, got {type(outputs).__name__}")
        entry = _Graph(graph, inputs, outputs, side)
        hold_stream(side, entry)
        return entry


def _recover_from_failed_capture(caller: torch.cuda.Stream, side: torch.cuda.Stream) -> None:
    """Undo what a capture that failed inside (an invalidated capture: ``capture_end`` raises) leaves behind.

    ``torch.cuda.graph`` exits its stream context only after ``capture_end`` returned, so the capture stream stays
    current: the caller's is made current again. And in torch 2.11 ``CUDAGraph::capture_end`` raises before
    ``CUDAGeneratorState::capture_epilogue``, so the default generator stays in capture mode, where every later draw
    on the device (an eager augmentation, a replay of a graph that draws) raises "Offset increment outside graph
    capture encountered unexpectedly": a trivial capture runs its prologue and epilogue again (a no-op in releases
    that keep the capture state per capture)."""
    if torch.cuda.current_stream(caller.device) != caller:
        torch.cuda.set_stream(caller)
    try:
        with torch.cuda.graph(torch.cuda.CUDAGraph(), stream=side):
            torch.zeros(1, device=caller.device)
    except Exception:  # nothing more to undo
        pass
    if torch.cuda.current_stream(caller.device) != caller:
        torch.cuda.set_stream(caller)


class _CloneGrad(torch.autograd.Function):
    """Identity whose backward clones the gradient: a graphed backward returns its static gradient buffers, which must
    not become (or alias) a parameter's ``.grad`` that the next replay would overwrite. A missing gradient (an input
    the graph does not use) stays ``None``, as in eager mode (not zeros, which an optimizer would step on)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        ctx.set_materialize_grads(False)
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor | None) -> Tensor | None:
        return None if grad is None else grad.clone()


class _GraphedAutogradPass(_GraphCache):
    """What the graphed training passes share: a pass that autograd records (some input needs a gradient), captured
    forward and backward with `torch.cuda.make_graphed_callables`, keyed by its static arguments, its inputs'
    signature and the autocast state, and replayed with `_CloneGrad` on every input that needs a gradient.

    `GraphedPromptPass` keeps the graphs it drops alive until `reset` (``retire_dropped``):
    `torch.cuda.make_graphed_callables` captures on a stream it picks (the same one for every call in some torch
    releases, one of 32 pool streams in turn in others), and destroying a graph frees the cuBLAS workspace of its
    capture stream (torch 2.14.1, pytorch/pytorch#193402) while another live graph captured there, such as the
    training pass's, may still replay with it. Its graphs are small and it drops one per task. `GraphedTrainingPass`
    drops its graphs (keeping them would hold a batch's activations each), but only on a change of input structure.

    A batch smaller than the largest one seen (an epoch's last, partial batch) runs eagerly: the same kernels, so the
    same numbers, and no capture (about a second each) nor second graph for a step that comes once per epoch; with
    tasks of unequal sizes each task's last batch would otherwise be captured and evict the previous task's.
    """

    largest_batch = 0
    """The largest leading dimension of the first input seen (the batch)."""

    def usable(self, tensors: Sequence[Tensor]) -> bool:
        if not (
            self.disabled_reason is None
            and all(t.is_cuda for t in tensors)
            and torch.is_grad_enabled()
            and any(t.requires_grad for t in tensors)
            and not torch.cuda.is_current_stream_capturing()
        ):
            return False
        batch = tensors[0].shape[0] if tensors and len(tensors[0].shape) else 0
        self.largest_batch = max(self.largest_batch, batch)
        return batch == self.largest_batch

    @staticmethod
    def _key(static: Hashable, flat: Sequence[Tensor]) -> tuple:
        signature = tuple((tuple(t.shape), t.dtype, t.stride(), t.requires_grad) for t in flat)
        return static, signature, _autocast_state("cuda")

    @staticmethod
    def _replay(graphed: Callable[..., Outputs], flat: Sequence[Tensor]) -> Outputs:
        return graphed(*(_CloneGrad.apply(t) if t.requires_grad else t for t in flat))

    def _graph(self, run: Callable[..., Outputs], flat: Sequence[Tensor], what: str) -> Callable[..., Outputs] | None:
        """``run`` captured forward and backward on copies of ``flat``; ``None`` (and eager from now on) if capture
        fails."""
        sample = tuple(t.detach().clone().requires_grad_(t.requires_grad) for t in flat)
        caller = torch.cuda.current_stream(flat[0].device)
        try:
            with _capture_autocast():
                return torch.cuda.make_graphed_callables(run, sample, num_warmup_iters=self.warmup,
                                                         allow_unused_input=True)
        except Exception as err:
            _recover_from_failed_capture(caller, private_stream(caller.device))
            self._disable(err, what)
            return None


class GraphedTrainingPass(_GraphedAutogradPass):
    """A frozen `PromptedViT`'s prompted pass, forward *and* backward, replayed from CUDA graphs.

    In a prompt learner's training step the frozen ViT's pass is the part autograd records: the prefixes and extra
    tokens come from trainable parameters, so gradients flow back through the frozen blocks to them. Run eagerly this
    pass costs a launch per kernel forward and backward; captured with `torch.cuda.make_graphed_callables` it is one
    forward and one backward graph. One graph pair per input structure (prompted layers, extra tokens,
    ``return_blocks``) and signature; the ViT's weights are read in place, so they must not change between replays
    (they are frozen). Off CUDA, when autograd does not record, or when no input needs a gradient, the ViT runs
    eagerly; a failed capture warns and falls back to eager for good.

    Args:
        vit: the frozen prompted ViT.
        max_graphs: graph pairs kept (least recently used first out); each holds the pass's activations.
        warmup: eager forward+backward iterations before capture.
        capture_after: a signature is captured on its ``capture_after``-th call (the earlier ones run eagerly).
    """

    def __init__(self, vit: nn.Module, max_graphs: int = 2, warmup: int = 3, capture_after: int = 2) -> None:
        super().__init__([vit], max_graphs, warmup, capture_after)
        self.vit = vit

    def __call__(
        self,
        images: Tensor,
        prefixes: dict[int, Prefix] | None = None,
        prepend: Tensor | None = None,
        append: Tensor | None = None,
        return_blocks: bool = False,
    ) -> ViTOutput:
        """`PromptedViT.forward`'s arguments and result."""
        prefixes = prefixes or {}
        layers = tuple(sorted(prefixes))
        flat = [images, *(t for layer in layers for t in prefixes[layer])]
        flat += [t for t in (prepend, append) if t is not None]
        if not self.usable(flat):
            return self.vit(images, prefixes, prepend, append, return_blocks)
        structure = (layers, prepend is not None, append is not None, return_blocks)
        graphed = self._lookup(self._key(structure, flat), lambda: self._capture(flat, structure))
        if graphed is None:
            return self.vit(images, prefixes, prepend, append, return_blocks)
        tokens, *blocks = self._replay(graphed, flat)
        return ViTOutput(tokens=tokens, blocks=blocks)

    def _capture(self, flat: Sequence[Tensor], structure: tuple) -> Callable[..., Outputs] | None:
        layers, has_prepend, has_append, return_blocks = structure

        def run(*tensors: Tensor) -> Outputs:
            rest = list(tensors[1:])
            prefixes = {layer: (rest.pop(0), rest.pop(0)) for layer in layers}
            prepend = rest.pop(0) if has_prepend else None
            append = rest.pop(0) if has_append else None
            out = self.vit(tensors[0], prefixes, prepend, append, return_blocks)
            return (out.tokens, *out.blocks)

        return self._graph(run, flat, "the training pass")


class GraphedPromptPass(_GraphedAutogradPass):
    """A prompt pool's training pass, forward *and* backward, replayed from CUDA graphs.

    In a training step the pool assembles its prompts from the query and its trainable parameters (CODA-Prompt: per
    prompted layer, slice the task's components, normalise, two einsums), and autograd records every one of those
    small operations; on a GPU the host time of launching them and of their backward nodes outlasts their kernels.
    Captured with `torch.cuda.make_graphed_callables` (the pool run through `torch.func.functional_call` with its
    parameters as graph inputs, so their gradients come out of the graphed backward) the pass is one forward and one
    backward replay. One graph pair per task (the slices in use change with it), ``train`` flag and input signature.
    Off CUDA, when autograd does not record, or when no input needs a gradient, the pool runs eagerly; a failed capture
    warns and falls back to eager for good.

    Args:
        pool: the prompt pool (`cdl_lightning.nn.prompts.PromptPool`): ``pool(query, task, train) -> PromptOutput``.
        max_graphs: graph pairs kept (least recently used first out).
        warmup: eager forward+backward iterations before capture.
        capture_after: a signature is captured on its ``capture_after``-th call (the earlier ones run eagerly).
    """

    retire_dropped = True

    def __init__(self, pool: nn.Module, max_graphs: int = 2, warmup: int = 3, capture_after: int = 2) -> None:
        super().__init__([pool], max_graphs, warmup, capture_after)
        self.pool = pool

    def __call__(self, query: Tensor, task: int, train: bool) -> PromptOutput:
        named = list(self.pool.named_parameters())
        names = tuple(name for name, _ in named)
        flat = [query, *(p for _, p in named)]
        if not self.usable(flat):
            return self.pool(query, task, train)
        entry = self._lookup(self._key((task, train, names), flat), lambda: self._capture(flat, names, task, train))
        if entry is None:
            return self.pool(query, task, train)
        graphed, layout = entry  # type: ignore[misc]
        return layout.unflatten(self._replay(graphed, flat))

    def runner(self, names: Sequence[str], task: int, train: bool) -> tuple[Callable[..., Outputs], _PromptLayout]:
        """``run(query, *parameters) -> flat outputs`` (the pool through `torch.func.functional_call`) and the layout
        that turns its outputs back into a `PromptOutput` (filled by the first call)."""
        layout = _PromptLayout()

        def run(query: Tensor, *parameters: Tensor) -> Outputs:
            out = torch.func.functional_call(self.pool, dict(zip(names, parameters, strict=True)), (query, task, train))
            return layout.flatten(out)

        return run, layout

    def _capture(self, flat: Sequence[Tensor], names: Sequence[str], task: int, train: bool) -> tuple | None:
        run, layout = self.runner(names, task, train)
        graphed = self._graph(run, flat, "the prompt pass")
        return None if graphed is None else (graphed, layout)


class _PromptLayout:
    """How a `PromptOutput` is laid out as a flat tuple of tensors: ``(Pk, Pv)`` per layer in layer order, the loss,
    then ``selected`` if the pool returns it."""

    def __init__(self) -> None:
        self.layers: tuple[int, ...] | None = None
        self.has_selected = False

    def flatten(self, out: PromptOutput) -> Outputs:
        layers = tuple(sorted(out.prefixes))
        if self.layers is None:
            self.layers, self.has_selected = layers, out.selected is not None
        elif layers != self.layers or (out.selected is not None) != self.has_selected:
            raise RuntimeError(f"the prompt pool's output changed structure ({layers} vs {self.layers})")
        flat = [t for layer in layers for t in out.prefixes[layer]] + [out.loss]
        return (*flat, *([out.selected] if out.selected is not None else []))

    def unflatten(self, flat: Sequence[Tensor]) -> PromptOutput:
        assert self.layers is not None, "flatten first"
        n = len(self.layers)
        prefixes = {layer: (flat[2 * i], flat[2 * i + 1]) for i, layer in enumerate(self.layers)}
        selected = flat[2 * n + 1] if self.has_selected else None
        return PromptOutput(prefixes=prefixes, loss=flat[2 * n], selected=selected)
