"""`FastPaths`: a learner's speed paths (frozen-weight casting, ``torch.compile``, CUDA graphs, the patch embedding as
a GEMM) as one component.

Pure torch (no Lightning): the learner holds one instance built from its ``compile`` / ``cast_frozen_weights`` /
``cuda_graphs`` / ``graph_prompts`` / ``patch_embed_gemm`` arguments and asks it for the passes to run; a script may
flip the flags on the instance before the first step (``model.fast_paths.cuda_graphs = False``; ``patch_embed_gemm``
then needs `FastPaths.patch_embed_`, which a trainer's ``setup`` calls).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from cdl_lightning.nn.batch_padding import BatchPadding
from cdl_lightning.nn.graphs import GraphedFunction, GraphedPromptPass, GraphedTrainingPass, hold_stream, private_stream
from cdl_lightning.nn.vit import PromptedViT

__all__ = ["FastPaths", "MIXED_PRECISION_DTYPES", "PlainForward", "RECOMPILE_LIMIT", "raise_recompile_limit"]

MIXED_PRECISION_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
"""Trainer precisions under which frozen matmul weights are stored in the autocast dtype (``cast_frozen_weights``)."""


class FastPaths:
    """The speed paths of a prompt learner; none but ``compile`` and ``patch_embed_gemm`` change a number
    (``benchmarks/check_fast_paths.py``).

    Args:
        compile: ``torch.compile`` (inductor's default mode) the frozen ViTs' prompted forward and query pass in
            `compile_`. Not bitwise equal to eager: inductor fuses kernels (LayerNorm with its dtype casts, residual
            adds, GELU), so the numbers differ in their rounding (``benchmarks/check_fast_paths.py --compile``
            measures by how much); off by default. Without ``cuda_graphs`` every ViT pass runs compiled. With
            ``cuda_graphs`` (the default) the gradient-free passes (`graphed`: query passes, a distiller's teacher,
            evaluation, prediction) run the compiled code and are captured into `GraphedFunction`'s graphs (not
            inductor's own: no ``mode="reduce-overhead"``): a pass compiles in the eager calls before its capture,
            which `GraphedFunction` runs under the capture's autocast state (``torch.compile`` guards on it,
            its cast cache included), so nothing is compiled under capture; a capture that fails still falls back
            to eager with a warning (``disabled_reason``). The prompted training pass, where `training_pass` graphs
            it (CUDA, mixed precision), is captured from the ViT's plain forward and backward, not the compiled ones
            (capturing a compiled autograd pass with `torch.cuda.make_graphed_callables` was not tried), also in the
            eager calls around its graphs; where `training_pass` gives no graph (fp32, off CUDA) it runs compiled.
        cast_frozen_weights: `cast` stores the frozen ViTs' Linear/Conv weights in the autocast dtype of a mixed
            precision (autocast would re-cast them on every pass; bit-identical results).
        cuda_graphs: on CUDA, replay the frozen passes from CUDA graphs: the gradient-free ones through `graphed`
            (`GraphedFunction`), the prompted training pass forward and backward through `training_pass`
            (`GraphedTrainingPass`, under mixed precision only).
        graph_prompts: with ``cuda_graphs``, also replay the prompt pool's training pass (prompt assembly, forward
            and backward) from CUDA graphs (`GraphedPromptPass`, under mixed precision only); bitwise equal to eager
            on an H200 (``benchmarks/check_fast_paths.py``, ``tests/gpu``). Off by default: see
            `PromptLearner`'s ``graph_prompts``.
        side_stream: with ``cuda_graphs``, run the passes given to `aside` within `overlap` (a distiller's teacher
            in its training step) on a second CUDA stream, concurrently with what the step queues next (the
            student's passes), until `join`. The same kernels (graph replays) run, only at the same time as others,
            so every number is unchanged; the GPU is busier because a ViT-S pass at batch 64 leaves much of an H200
            idle. Each `GraphedFunction` graph is captured on a stream of its own, and those and the second stream
            come from the high-priority stream pool (`cdl_lightning.nn.graphs.private_stream`): graphs captured on
            one shared stream share cuBLAS's workspace and, replayed concurrently, corrupted each other's results
            (NaN losses on an H200 before that fix), and the default-priority pool hands its 32 streams out again and
            again. (The teacher's kernels so run at a higher priority than the student's; the speed-up quoted for
            `Distiller`'s ``concurrent_teacher`` was measured with the default priority, not re-measured since.)
        compile_training_pass: with ``compile`` and ``cuda_graphs``, capture the *compiled* prompted training pass
            (forward and backward) in `training_pass`'s graphs instead of the plain one (`PlainForward`). Experimental
            and off: it runs on an H100 (``tests/gpu``; after 5 bf16 steps within 3.2e-4 of eager in the losses) but
            the B->S KDP step gained nothing (2,494 vs 2,510 img/s with ``compile`` and ``patch_embed_gemm``,
            ``benchmarks/measured/2026-12-08_h100``); set it on the instance before the first step
            (``model.fast_paths.compile_training_pass = True``; ``benchmarks/throughput.py --compile-training-pass``).
        patch_embed_gemm: `patch_embed_` runs the frozen ViTs' patch embedding (timm's ``PatchEmbed``: a Conv2d with
            kernel == stride == patch size) as a reshape and one GEMM (`cdl_lightning.nn.vit.GemmPatchEmbed`) in every
            pass, prompted and query. Not bitwise equal to the convolution (another summation order;
            ``benchmarks/check_fast_paths.py --patch-embed-gemm`` measures the deviation); off by default. A ViT whose
            patch embedding is not eligible (e.g. ``dynamic_img_size``) keeps its convolution, with a warning.

    Attributes:
        runners: the graph wrappers by name (created on first use, CUDA only).
        streams: the second CUDA stream of each device `aside` ran on (created on first use).
    """

    def __init__(
        self, compile: bool = False, cast_frozen_weights: bool = True, cuda_graphs: bool = True,
        graph_prompts: bool = False, side_stream: bool = False, patch_embed_gemm: bool = False,
        compile_training_pass: bool = False,
    ) -> None:
        self.compile = compile
        self.cast_frozen_weights = cast_frozen_weights
        self.cuda_graphs = cuda_graphs
        self.graph_prompts = graph_prompts
        self.side_stream = side_stream
        self.patch_embed_gemm = patch_embed_gemm
        self.compile_training_pass = compile_training_pass
        self.streams: dict[torch.device, torch.cuda.Stream] = {}
        self._pending: list[tuple[torch.cuda.Stream, torch.cuda.Event]] = []
        self._overlap = 0  # open `overlap` scopes
        self.runners: dict[str, GraphedFunction | GraphedTrainingPass | GraphedPromptPass] = {}
        self._compiled = False

    @property
    def uses_cuda_graphs(self) -> bool:
        """``cuda_graphs`` is on (with ``compile`` too: the compiled gradient-free passes are then captured)."""
        return bool(self.cuda_graphs)

    def graphed(self, name: str, fn: Callable, modules: Sequence[nn.Module]) -> Callable:
        """``fn`` (a gradient-free pass reading ``modules``) run from CUDA graphs when they are on (the wrapper runs
        it eagerly off CUDA or under autograd), one wrapper per ``name``; ``fn`` itself when they are off."""
        if not self.uses_cuda_graphs:
            return fn
        if name not in self.runners:
            self.runners[name] = GraphedFunction(fn, list(modules))
        return self.runners[name]

    def training_pass(self, vit: nn.Module, on_cuda: bool) -> GraphedTrainingPass | None:
        """The graphed forward+backward of the prompted ``vit`` for a training step on CUDA under autocast (mixed
        precision), else ``None`` (eager). Under ``bf16-mixed`` the fast paths are bitwise equal to the plain run
        (`tests/gpu`, H200). In fp32 they are not: after 4 steps of a ViT-B -> ViT-S KDP student on an H200 the
        learned prompt keys differed by up to 9e-10 with this pass graphed and the components by up to 3e-11 with it
        eager (losses bitwise equal; the remaining cause, in the gradient-free graphs, is not established). fp32 steps
        are GPU-bound, so they run this pass eagerly, the smaller deviation. With ``compile`` the graphs capture the
        ViT's plain (uncompiled) forward and backward (`PlainForward`), unless ``compile_training_pass``."""
        plain = self.compile and not self.compile_training_pass
        make = lambda: GraphedTrainingPass(PlainForward(vit) if plain else vit)  # noqa: E731
        return self._training_runner("train", make, on_cuda)  # type: ignore[return-value]

    def prompt_pass(self, pool: nn.Module | None, on_cuda: bool) -> GraphedPromptPass | None:
        """The graphed training pass of the prompt ``pool`` on CUDA under autocast when ``graph_prompts`` (and
        ``cuda_graphs``) is on, else ``None`` (eager)."""
        if pool is None or not self.graph_prompts:
            return None
        return self._training_runner("prompt", lambda: GraphedPromptPass(pool), on_cuda)  # type: ignore[return-value]

    def _training_runner(self, name: str, make: Callable[[], GraphedTrainingPass | GraphedPromptPass],
                         on_cuda: bool) -> GraphedTrainingPass | GraphedPromptPass | None:
        """The runner ``name`` (made once) for a training step on CUDA with graphs on and under autocast, else
        ``None``."""
        if not (on_cuda and self.uses_cuda_graphs and torch.is_autocast_enabled("cuda")):
            return None
        if name not in self.runners:
            self.runners[name] = make()
        return self.runners[name]  # type: ignore[return-value]

    @contextmanager
    def overlap(self) -> Iterator[None]:
        """The scope in which `aside` may queue its passes on the second stream (a distiller's training step, whose
        loss calls `join` first). On leaving it, by an error too, the current stream waits for whatever is still
        pending: outside it `aside` runs its pass at once, so code that never calls `join` (a `training_step` of
        its own) cannot read a pass's outputs before they are written, and no events pile up."""
        self._overlap += 1
        try:
            yield
        finally:
            self._overlap -= 1
            if not self._overlap:
                self.join()

    def aside(self, fn: Callable[[], tuple[Tensor, ...]], inputs: Sequence[Tensor]) -> tuple[Tensor, ...]:
        """``fn()`` (a gradient-free pass that reads, of the tensors the caller made, only ``inputs``) queued on this
        device's second stream when ``side_stream`` is on, within `overlap`, with CUDA graphs on and inputs on CUDA;
        else run as is. The second stream first waits for everything queued so far; the returned tensors may only
        be read after `join`. Until then the inputs' and outputs' memory is kept from reuse (``record_stream``)."""
        device = inputs[0].device if inputs else None
        if not (self.side_stream and self._overlap and self.uses_cuda_graphs and device is not None
                and device.type == "cuda"):
            return fn()
        main = torch.cuda.current_stream(device)
        side = self.streams.get(device)
        if side is None:
            side = self.streams[device] = private_stream(device)
            hold_stream(side, self)
        side.wait_stream(main)
        for tensor in inputs:  # (before fn: also if it raises after queueing work)
            tensor.record_stream(side)  # freed by the caller while the side stream reads it: not reused before
        with torch.cuda.stream(side):
            outputs = fn()
        for tensor in outputs:
            tensor.record_stream(main)  # made on the side stream, read and freed on the main one
        self._pending.append((main, side.record_event()))
        return outputs

    def join(self) -> None:
        """Make the stream that called `aside` wait for the passes it queued there (a no-op when none are pending)."""
        for main, done in self._pending:
            main.wait_event(done)
        self._pending.clear()

    def cast(self, vits: Sequence[PromptedViT], precision: str | torch.dtype | None) -> None:
        """Store the frozen weights of ``vits`` in the autocast dtype of ``precision`` (a trainer precision string such
        as ``"bf16-mixed"`` or a dtype) when ``cast_frozen_weights`` is on; full precisions leave them alone."""
        dtype = precision if isinstance(precision, torch.dtype) else MIXED_PRECISION_DTYPES.get(str(precision))
        if dtype is None or not self.cast_frozen_weights:
            return
        for vit in vits:
            vit.cast_matmul_weights_(dtype)

    def patch_embed_(self, vits: Sequence[PromptedViT]) -> None:
        """Set every ViT of ``vits`` to run its patch embedding as reshape + GEMM if ``patch_embed_gemm`` is on, as its
        convolution if off (`PromptedViT.patch_embed_gemm_`; idempotent). The learner calls it when it is built (a
        distiller once more with its teacher) and in ``setup``, so a flag flipped on the instance before a trainer runs
        applies too; a Python loop without a trainer that flips it calls this itself."""
        for vit in vits:
            vit.patch_embed_gemm_(self.patch_embed_gemm)

    def compile_(self, vits: Sequence[PromptedViT], batch_sizes: Iterable[int] = ()) -> None:
        """``torch.compile`` the prompted forward and the query pass of ``vits`` (once) when ``compile`` is on.
        Lazy: each pass compiles on its first call (with ``cuda_graphs``, before its capture). ``batch_sizes``: the
        full batch sizes the passes will meet (the learner passes its data module's training and evaluation batch
        sizes), each compiled for itself; a smaller batch runs padded to the smallest of them that fits.

        Static shapes (``dynamic=False``), smaller batches padded (`cdl_lightning.nn.batch_padding.BatchPadding`).
        Dynamo's default (automatic dynamic shapes) recompiles a pass for a *symbolic* batch size the first time the
        batch size changes, which a real run does at every epoch's last, smaller batch, and from then on every batch
        ran the dynamic-shape code: in ``cdl fit`` on an H100 the compiled ViT-B teacher (with ``patch_embed_gemm``)
        trained at 1,440 img/s (steady) against 2,052 eager, although ``benchmarks/throughput.py --compile`` (one
        batch size) showed +5% (2026-12-07, ``benchmarks/measured/2026-12-07_h100``). Static shapes alone would
        compile once per batch size met, and evaluation meets a new remainder at every task (it covers every task
        seen); so a batch smaller than one a pass has compiled for runs padded to it with zero rows (samples do not
        interact in a ViT; the real rows' numbers differ only in rounding, as ``compile`` already does). The prompted
        forwards of all ViTs share one code object (``nn.Module._call_impl``), whose entries (per ViT, grad mode and
        batch size) could pass dynamo's recompile limit of 8, so it is raised to `RECOMPILE_LIMIT` (a process-wide
        setting; never lowered)."""
        if not self.compile or self._compiled:
            return
        raise_recompile_limit(RECOMPILE_LIMIT)
        for vit in vits:
            vit.compile(dynamic=False)  # the prompted forward
            vit._compiled_call_impl = BatchPadding(vit._compiled_call_impl, batch_sizes)
            vit.query_pass = BatchPadding(torch.compile(vit.vit.forward_features, dynamic=False), batch_sizes)
        self._compiled = True

    def reset(self) -> None:
        """Drop every captured graph (e.g. between benchmark cases)."""
        for runner in self.runners.values():
            runner.reset()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(compile={self.compile}, cast_frozen_weights={self.cast_frozen_weights}, "
                f"cuda_graphs={self.cuda_graphs}, graph_prompts={self.graph_prompts}, side_stream={self.side_stream}, "
                f"patch_embed_gemm={self.patch_embed_gemm}, compile_training_pass={self.compile_training_pass}, "
                f"runners={sorted(self.runners)})")


RECOMPILE_LIMIT = 64
"""The dynamo recompile limit (entries per code object) that `FastPaths.compile_` ensures."""


def raise_recompile_limit(limit: int) -> None:
    """Raise dynamo's per-code-object recompile limit to at least ``limit`` (``recompile_limit``; named
    ``cache_size_limit`` before torch 2.6). A pass past the limit runs eagerly (dynamo warns)."""
    import torch._dynamo  # noqa: PLC0415  (loaded by torch.compile anyway; not at import time)

    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), limit))


class PlainForward(nn.Module):
    """A `PromptedViT` called through its plain ``forward``, past the compiled call that `FastPaths.compile_` installs
    (``nn.Module.compile``): what `GraphedTrainingPass` captures with ``compile`` and ``cuda_graphs`` on. Its
    parameters are the ViT's (for the graph's storage check); the ViT has no hooks that this would skip."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.vit = vit

    def forward(self, *args: object, **kwargs: object) -> object:
        return self.vit.forward(*args, **kwargs)
