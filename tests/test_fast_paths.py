"""The speed paths of the frozen passes change no numbers: frozen matmul weights stored in the autocast dtype
(`PromptedViT.cast_matmul_weights_`, ``cast_frozen_weights``) and the CUDA-graph wrapper's CPU behaviour
(`GraphedFunction`; its CUDA replay is checked against eager on the GPU by ``benchmarks/check_fast_paths.py``)."""

from __future__ import annotations

import copy
import warnings
from unittest import mock

import pytest
import torch
from torch import nn

from cdl_lightning.nn import PromptedViT
from cdl_lightning.nn.graphs import GraphedFunction, GraphedTrainingPass, _CloneGrad


@pytest.fixture()
def vit(tiny_vit_config) -> PromptedViT:
    return tiny_vit_config.build()


def prefixes(vit: PromptedViT) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return {1: (torch.randn(2, 4, vit.embed_dim, generator=g), torch.randn(2, 4, vit.embed_dim, generator=g))}


def test_cast_weights_are_bit_identical_under_autocast(vit):
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    reference = copy.deepcopy(vit)
    linears = sum(isinstance(m, nn.Linear) for m in vit.modules())
    assert vit.cast_matmul_weights_(torch.bfloat16) == 2 * linears + 2  # weights and biases, plus the patch conv
    assert vit.vit.patch_embed.proj.weight.dtype == torch.bfloat16
    assert vit.vit.blocks[0].attn.qkv.weight.dtype == torch.bfloat16
    assert vit.vit.blocks[0].norm1.weight.dtype == torch.float32  # norms, pos embed and class token stay fp32
    assert vit.vit.pos_embed.dtype == torch.float32 and vit.vit.cls_token.dtype == torch.float32
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = reference(images, prefixes(reference), append=torch.ones(1, 1, vit.embed_dim), return_blocks=True)
        actual = vit(images, prefixes(vit), append=torch.ones(1, 1, vit.embed_dim), return_blocks=True)
        assert torch.equal(vit.query(images), reference.query(images))
    assert torch.equal(actual.tokens, expected.tokens)
    assert all(torch.equal(a, e) for a, e in zip(actual.blocks, expected.blocks, strict=True))


def test_cast_vit_runs_itself_under_autocast_in_fp32_code(vit):
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    reference = copy.deepcopy(vit)
    vit.cast_matmul_weights_(torch.bfloat16)
    with torch.no_grad():
        actual = vit(images).tokens  # no autocast around: the ViT enters it itself instead of failing on dtypes
        with torch.autocast("cpu", dtype=torch.bfloat16):
            expected = reference(images).tokens
        fp32 = reference(images).tokens
    assert torch.equal(actual, expected)
    assert not torch.equal(actual, fp32)
    torch.testing.assert_close(actual.float(), fp32, rtol=0.1, atol=0.1)  # bf16 rounding only


def test_cast_back_to_fp32_and_refuses_trainable(vit):
    vit.cast_matmul_weights_(torch.bfloat16)
    vit.cast_matmul_weights_(torch.float32)
    assert all(p.dtype == torch.float32 for p in vit.parameters()) and vit.matmul_dtype == torch.float32
    vit.vit.blocks[0].attn.qkv.weight.requires_grad_(True)
    with pytest.raises(RuntimeError, match="frozen ViTs"):
        vit.cast_matmul_weights_(torch.bfloat16)


def test_graphed_function_calls_through_off_cuda():
    calls = []

    def double(x: torch.Tensor, scale: int) -> tuple[torch.Tensor]:
        calls.append(scale)
        return (x * scale,)

    graphed = GraphedFunction(double, [])
    x = torch.arange(3.0)
    with torch.no_grad():
        (out,) = graphed(x, scale=2)
    assert torch.equal(out, x * 2) and calls == [2]
    assert graphed.captures == 0 and graphed.replays == 0 and not graphed.graphs
    assert not graphed.usable([x])  # CPU tensors are never captured
    with pytest.raises(ValueError, match="max_graphs"):
        GraphedFunction(double, [], max_graphs=0)


def test_graphed_training_pass_runs_the_vit_off_cuda(vit):
    graphed = GraphedTrainingPass(vit)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    pk = torch.randn(1, 4, vit.embed_dim, requires_grad=True)
    pv = torch.randn(1, 4, vit.embed_dim, requires_grad=True)
    token = torch.randn(1, 1, vit.embed_dim, requires_grad=True)
    out = graphed(images, {1: (pk, pv)}, append=token, return_blocks=True)
    expected = vit(images, {1: (pk, pv)}, append=token, return_blocks=True)
    assert torch.equal(out.tokens, expected.tokens) and len(out.blocks) == vit.depth
    out.tokens.sum().backward()
    assert pk.grad is not None and token.grad is not None
    assert graphed.captures == 0 and graphed.replays == 0 and not graphed.graphs


def test_clone_grad_gives_a_fresh_gradient_tensor():
    """A graphed backward returns static buffers: what reaches a parameter must be a copy, never the buffer."""
    buffer = torch.ones(3)
    x = torch.zeros(3, requires_grad=True)

    class Static(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t.clone()

        @staticmethod
        def backward(ctx, grad):
            return buffer

    Static.apply(_CloneGrad.apply(x)).sum().backward()
    assert torch.equal(x.grad, buffer) and x.grad.data_ptr() != buffer.data_ptr()


def test_cuda_graphs_default_on_and_compile_combines_with_them(tiny_vit_config):
    from cdl_lightning.models import PromptLearner

    def learner(**kwargs):
        return PromptLearner(backbone=tiny_vit_config, task_sizes=[2, 2], **kwargs)

    assert learner().uses_cuda_graphs
    assert not learner(cuda_graphs=False).uses_cuda_graphs
    assert learner(compile=True).uses_cuda_graphs  # the compiled gradient-free passes are captured
    assert not learner(compile=True, cuda_graphs=False).uses_cuda_graphs  # compiled, no graphs
    model = learner(cuda_graphs=False)
    with torch.no_grad():
        fn = lambda images: (images,)  # noqa: E731
        assert model.graphed("x", fn, []) is fn and not model.graph_runners


def test_fast_paths_component_holds_the_flags_and_acts_on_them(tiny_vit_config):
    from cdl_lightning.models import PromptLearner
    from cdl_lightning.models.fast_paths import FastPaths

    model = PromptLearner(backbone=tiny_vit_config, task_sizes=[2, 2], cast_frozen_weights=False, cuda_graphs=False)
    paths = model.fast_paths
    assert isinstance(paths, FastPaths)
    assert (paths.compile, paths.cast_frozen_weights, paths.cuda_graphs) == (False, False, False)
    assert model.graph_runners is paths.runners
    vit = model.classifier.backbone
    weight = vit.vit.blocks[0].attn.qkv.weight
    paths.cast(model.frozen_vits(), "bf16-mixed")  # cast_frozen_weights off: unchanged
    assert weight.dtype == torch.float32
    paths.cast_frozen_weights = True
    paths.cast(model.frozen_vits(), "32-true")  # full precision: unchanged
    assert vit.vit.blocks[0].attn.qkv.weight.dtype == torch.float32
    paths.cast(model.frozen_vits(), "bf16-mixed")
    assert vit.vit.blocks[0].attn.qkv.weight.dtype == torch.bfloat16
    # off CUDA the training pass runs eagerly; with graphs on a wrapper is created once per name
    paths.cuda_graphs = True
    assert model.uses_cuda_graphs and paths.training_pass(vit, on_cuda=False) is None
    assert paths.training_pass(vit, on_cuda=True) is None  # fp32 (no autocast): eager, bitwise the plain run
    with mock.patch.object(torch, "is_autocast_enabled", lambda device_type=None: device_type == "cuda"):
        assert isinstance(paths.training_pass(vit, on_cuda=True), GraphedTrainingPass)  # under mixed precision
    fn = lambda images: (images,)  # noqa: E731
    runner = model.graphed("x", fn, [vit])
    assert isinstance(runner, GraphedFunction) and model.graphed("x", fn, [vit]) is runner
    assert sorted(paths.runners) == ["train", "x"]
    x = torch.rand(2, 3)
    with torch.no_grad():
        assert torch.equal(runner(x)[0], x)  # CPU: called eagerly


def test_backbone_from_a_weights_file_is_built_without_random_init(tmp_path, tiny_vit_config, monkeypatch):
    import dataclasses

    from timm.models import vision_transformer

    source = tiny_vit_config.build()
    path = tmp_path / "weights.pth"
    torch.save(source.vit.state_dict(), path)
    calls = []
    monkeypatch.setattr(vision_transformer.VisionTransformer, "init_weights",
                        lambda self, *a, **k: calls.append(self.pos_embed.device.type), raising=True)
    built = dataclasses.replace(tiny_vit_config, checkpoint_path=str(path), init_seed=123).build()
    assert calls == ["meta"]  # the random initialisation only touched meta tensors: no work, no memory
    state, expected = built.vit.state_dict(), source.vit.state_dict()
    assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in expected)
    assert all(p.device.type == "cpu" and not p.requires_grad for p in built.parameters())


def test_a_signature_is_captured_on_its_second_call_only():
    graphed = GraphedFunction(lambda x: (x,), [], max_graphs=2)
    captured = []

    def capture(name):
        return lambda: captured.append(name) or f"graph {name}"

    assert graphed._lookup("a", capture("a")) is None  # first call of "a": eager, no capture
    assert graphed._lookup("a", capture("a")) == "graph a" and captured == ["a"]
    assert graphed._lookup("a", capture("a")) == "graph a" and captured == ["a"]  # replayed
    assert graphed._lookup("b", capture("b")) is None  # a signature met once (a last, smaller batch) costs nothing
    assert (graphed.captures, graphed.replays, graphed.calls) == (1, 2, {"a": 3, "b": 1})
    assert GraphedFunction(lambda x: (x,), [], capture_after=1)._lookup("c", capture("c")) == "graph c"
    with pytest.raises(ValueError, match="capture_after"):
        GraphedTrainingPass(nn.Linear(2, 2), capture_after=0)


@pytest.mark.parametrize("kind", ["coda", "l2p", "dualprompt"])
def test_graphed_prompt_pass_runs_the_pool_through_functional_call_bit_for_bit(kind):
    """What `GraphedPromptPass` captures on a GPU (the pool through `torch.func.functional_call`, its parameters as
    inputs, the output flattened and rebuilt) gives the pool's own prompts, loss and parameter gradients exactly;
    off CUDA the wrapper calls the pool itself."""
    from cdl_lightning.nn import L2P, CodaPrompt, DualPrompt
    from cdl_lightning.nn.graphs import GraphedPromptPass

    torch.manual_seed(0)
    pools = {
        "coda": lambda: CodaPrompt(32, 24, num_tasks=3, pool_size=12, length=4, layers=(0, 2), ortho_weight=0.1),
        "l2p": lambda: L2P(32, 24, num_tasks=3, pool_size=6, length=4, top_k=2, layers=(0, 1)),
        "dualprompt": lambda: DualPrompt(32, 24, num_tasks=3, g_length=2, g_layers=(0,), pool_size=3, e_length=4,
                                         e_layers=(1, 2)),
    }
    pool = pools[kind]()
    pool.start_task(1)  # CODA: task 0's components detached, task 1's trained
    query = torch.randn(5, 24)
    graphed = GraphedPromptPass(pool)
    names = tuple(name for name, _ in pool.named_parameters())
    params = [p for _, p in pool.named_parameters()]
    run, layout = graphed.runner(names, task=1, train=True)
    inputs = [p.detach().clone().requires_grad_(True) for p in params]
    rebuilt = layout.unflatten(run(query, *inputs))
    eager = pool(query, 1, True)
    assert sorted(rebuilt.prefixes) == sorted(eager.prefixes)
    for layer, (key, value) in eager.prefixes.items():
        assert torch.equal(rebuilt.prefixes[layer][0], key) and torch.equal(rebuilt.prefixes[layer][1], value)
    assert torch.equal(rebuilt.loss, eager.loss)
    assert (rebuilt.selected is None) == (eager.selected is None)
    if eager.selected is not None:
        assert torch.equal(rebuilt.selected, eager.selected)

    def objective(out):  # every prompt row and the loss contribute
        return sum((k * k).sum() + (v * 0.5).sum() for k, v in out.prefixes.values()) + out.loss

    wanted = torch.autograd.grad(objective(eager), params, allow_unused=True)
    got = torch.autograd.grad(objective(rebuilt), inputs, allow_unused=True)
    for name, w, g in zip(names, wanted, got, strict=True):
        assert (w is None) == (g is None), name
        assert w is None or torch.equal(w, g), name
    # off CUDA: the wrapper runs the pool itself, no graph
    direct = graphed(query, 1, True)
    assert all(torch.equal(direct.prefixes[layer][0], eager.prefixes[layer][0]) for layer in eager.prefixes)
    assert graphed.captures == 0 and graphed.replays == 0


def test_graph_prompts_is_off_by_default_and_wired_through_the_learner(tiny_vit_config):
    from cdl_lightning.models import PromptLearner
    from cdl_lightning.nn import CodaPrompt
    from cdl_lightning.nn.graphs import GraphedPromptPass

    def learner(**kwargs):
        coda = lambda d, k, n: CodaPrompt(d, k, n, pool_size=8, layers=(0, 1))  # noqa: E731
        return PromptLearner(backbone=tiny_vit_config, prompt=coda, task_sizes=[2, 2], **kwargs)

    off = learner()
    assert off.fast_paths.graph_prompts is False and off.hparams["graph_prompts"] is False
    with mock.patch.object(torch, "is_autocast_enabled", lambda device_type=None: device_type == "cuda"):
        assert off.fast_paths.prompt_pass(off.classifier.prompt, on_cuda=True) is None
    model = learner(graph_prompts=True)
    assert model.hparams["graph_prompts"] is True
    paths, pool = model.fast_paths, model.classifier.prompt
    assert paths.graph_prompts and paths.prompt_pass(pool, on_cuda=False) is None
    assert paths.prompt_pass(pool, on_cuda=True) is None  # fp32 (no autocast): eager
    with mock.patch.object(torch, "is_autocast_enabled", lambda device_type=None: device_type == "cuda"):
        runner = paths.prompt_pass(pool, on_cuda=True)
        assert isinstance(runner, GraphedPromptPass) and paths.prompt_pass(pool, on_cuda=True) is runner
        assert paths.prompt_pass(None, on_cuda=True) is None  # no pool (a plain fine-tuning run)
        paths.cuda_graphs = False
        assert paths.prompt_pass(pool, on_cuda=True) is None
    # a CPU training step with the flag on is the plain step
    torch.manual_seed(0)
    plain = learner()
    torch.manual_seed(0)
    flagged = learner(graph_prompts=True)
    for m in (plain, flagged):
        m.log = lambda *args, **kwargs: None
        m.open_task(0)
    batch = (torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 0, 1]), torch.zeros(4, dtype=torch.long))
    assert torch.equal(plain.training_step(batch, 0), flagged.training_step(batch, 0))


def test_clone_grad_keeps_a_missing_gradient_missing():
    """An input a graphed backward gives no gradient (a parameter the graph does not use) keeps ``.grad is None``, as
    in eager mode; zeros would make Adam step it (momentum, weight decay)."""

    class NoGradient(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t * 2

        @staticmethod
        def backward(ctx, grad):
            return None

    x = torch.randn(3, requires_grad=True)
    NoGradient.apply(_CloneGrad.apply(x)).sum().backward()
    assert x.grad is None
    y = torch.randn(3, requires_grad=True)
    (_CloneGrad.apply(y) * 3).sum().backward()
    assert torch.equal(y.grad, torch.full((3,), 3.0))


class _FakeStream:
    """A stream of a fake PyTorch stream pool: equal when it is the same pool slot (as two `torch.cuda.Stream`
    objects of one slot are one CUDA stream), recording what waited on what."""

    def __init__(self, device: torch.device, pool: int, slot: int) -> None:
        self.device, self.cuda_stream = device, 1000 * (pool + 1) + slot  # a distinct handle per pool slot
        self.key, self.waited, self.events = (device, pool, slot), [], []

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _FakeStream) and other.key == self.key

    def __hash__(self) -> int:
        return hash(self.key)

    def wait_stream(self, other: _FakeStream) -> None:
        self.waited.append(other)

    def record_event(self) -> str:
        self.events.append(f"event {len(self.events)}")
        return self.events[-1]

    def wait_event(self, event: str) -> None:
        self.waited.append(event)


class _FakePool:
    """`torch.cuda.Stream(device, priority)` as c10/cuda/CUDAStream.cpp hands pool streams out: 32 per device and
    priority pool, round-robin (a priority maps to its pool, clamped to the pools there are)."""

    def __init__(self) -> None:
        self.counters: dict[tuple, int] = {}

    def __call__(self, device: torch.device | None = None, priority: int = 0) -> _FakeStream:
        device = torch.device("cuda", 0) if device is None else torch.device(device)
        pool = max(0, min(-priority, 3))
        n = self.counters[device, pool] = self.counters.get((device, pool), -1) + 1
        return _FakeStream(device, pool, n % 32)


class _FakeGraph:
    def __init__(self, stream: _FakeStream) -> None:
        self.stream = stream

    def __enter__(self) -> None:
        return None

    def __exit__(self, *args) -> None:
        return None


def test_each_graph_captures_on_a_stream_no_live_graph_and_no_other_code_uses(monkeypatch):
    """cuBLAS keeps a workspace per (handle, stream); a graph replays with its capture stream's one, and destroying a
    graph (evicted, re-captured, collected) frees that stream's workspaces (torch 2.14.1 ``CUDAGraph::reset``) under
    any other graph captured there. So each `GraphedFunction` graph gets a stream no live graph holds, on its inputs'
    device, from the high-priority pool: `torch.cuda.Stream()` (what `torch.cuda.make_graphed_callables` draws its
    capture stream with) hands the default pool's 32 streams out round-robin, so the 33rd draw is the first again."""
    from cdl_lightning.nn import graphs

    pool, used = _FakePool(), []
    monkeypatch.setattr(torch.cuda, "Stream", pool)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _FakeStream(device, -1, 0))
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: used.append(stream) or _FakeGraph(stream))
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: None)
    monkeypatch.setattr(torch.cuda, "graph", lambda graph, stream=None: _FakeGraph(stream))
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device=None: torch.zeros(16, dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device=None: None)
    monkeypatch.setattr(graphs, "_held_streams", {})
    teacher = GraphedFunction(lambda x: (x + 1,), warmup=1)
    x = torch.zeros(2)
    first = teacher._capture([x], {})
    assert first.stream.device == x.device and first.stream.key[1] == 1  # the inputs' device, high-priority pool
    others = [torch.cuda.Stream() for _ in range(100)]  # make_graphed_callables, torch.cuda.graph's default
    assert others[0] == others[32] and first.stream not in others
    # 31 more live graphs: each on a stream of its own (the pool has 32)
    live = [first] + [teacher._capture([x], {}) for _ in range(31)]
    assert len({entry.stream for entry in live}) == 32 and len(graphs._held_streams) == 32
    del live[5]  # an evicted graph gives its stream back: the next capture may take it, and only it
    again = teacher._capture([x], {})
    assert again.stream.key[2] == 5 and len(graphs._held_streams) == 32
    with pytest.warns(UserWarning, match="all 32 high-priority CUDA streams are held"):
        teacher._capture([x], {})  # a 33rd live graph: sharing cannot be avoided, and it says so


class _FakeGenerator:
    """The device's default CUDA generator as a draw counter: `torch.cuda.get_rng_state` / `set_rng_state` read and
    write it; the graphed function below draws from it."""

    def __init__(self) -> None:
        self.offset = 0
        self.devices: list = []

    def get(self, device=None) -> torch.Tensor:
        self.devices.append(device)
        return torch.tensor([self.offset])

    def set(self, state: torch.Tensor, device=None) -> None:
        self.devices.append(device)
        self.offset = int(state[0])


def _fake_capture_device(monkeypatch, current: list) -> None:
    """The CUDA calls of a capture on a fake device: the stream pool, ``current[0]`` as the current stream
    (`torch.cuda.set_stream` replaces it), graph objects never built, and no stream held by a live graph."""
    from cdl_lightning.nn import graphs

    monkeypatch.setattr(torch.cuda, "Stream", _FakePool())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current[0])
    monkeypatch.setattr(torch.cuda, "set_stream", lambda stream: current.__setitem__(0, stream))
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: None)
    monkeypatch.setattr(graphs, "_held_streams", {})


@pytest.mark.parametrize("capture_fails", [False, True])
def test_capture_undoes_the_draws_of_warm_up_and_capture(monkeypatch, capture_fails):
    """A graphed function that draws random numbers (the data module's augmentation) must draw what the eager call
    it replaces would: the warm-up calls before capture, and the capture itself, leave the device's generator where
    it was, also when capture fails (the pass then runs eagerly from the restored state, on the caller's stream)."""
    generator, main, used, captured = _FakeGenerator(), _FakeStream(torch.device("cpu"), -1, 0), [], []
    current = [main]

    class _Capture(_FakeGraph):  # `torch.cuda.graph`: its stream current inside; left current if capture_end raises
        def __init__(self, graph, stream=None) -> None:
            super().__init__(stream)
            captured.append(stream)

        def __enter__(self) -> None:
            self.previous, current[0] = current[0], self.stream

        def __exit__(self, error_type, *args) -> None:
            if error_type is None:
                current[0] = self.previous

    _fake_capture_device(monkeypatch, current)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: used.append(stream) or _FakeGraph(stream))
    monkeypatch.setattr(torch.cuda, "graph", _Capture)
    monkeypatch.setattr(torch.cuda, "get_rng_state", generator.get)
    monkeypatch.setattr(torch.cuda, "set_rng_state", generator.set)
    calls = []

    def augment(x):
        generator.offset += 4  # a kernel's draw
        calls.append(generator.offset)
        if capture_fails and len(calls) == 3:
            raise RuntimeError("operation not permitted when stream is capturing")
        return (x + 1,)

    generator.offset = 40
    function = GraphedFunction(augment, warmup=2)
    x = torch.zeros(2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        entry = function._capture([x], {})
    assert calls == [44, 48, 44]  # two warm-up calls, then the capture drew from the restored state
    assert generator.offset == 40  # and nothing of it stays drawn
    assert set(generator.devices) == {x.device}
    assert (entry is None) == capture_fails == (function.disabled_reason is not None) == bool(caught)
    # the caller's stream waits for the warm-up, and after a capture for the capture stream's pre-capture work (torch
    # 2.11 fills the generator's seed and offset tensors there, which a replay on the caller's stream refills and reads)
    assert main.waited == [used[0]] * (1 if capture_fails else 2)
    # a failed capture leaves the caller's stream current, and (torch 2.11) the generator out of capture mode: a
    # trivial capture on the same stream runs the generator's capture epilogue that the failed one skipped
    assert current[0] is main and captured == [used[0]] * (2 if capture_fails else 1)


def test_a_failed_training_pass_capture_gives_the_stream_back_and_rearms_the_generator(monkeypatch):
    """`torch.cuda.make_graphed_callables` failing inside a capture leaves that capture's stream current (and, torch
    2.11, the default generator in capture mode): the caller's stream is made current again, and a trivial capture on
    a free high-priority stream runs the generator's capture epilogue; the pass then runs eagerly."""
    from cdl_lightning.nn import graphs

    main, captured = _FakeStream(torch.device("cpu"), -1, 0), []
    current = [main]

    def make_graphed_callables(*args, **kwargs):
        current[0] = _FakeStream(torch.device("cpu"), 0, 7)  # torch.cuda.graph left its capture stream current
        raise RuntimeError("operation not permitted when stream is capturing")

    _fake_capture_device(monkeypatch, current)
    monkeypatch.setattr(torch.cuda, "make_graphed_callables", make_graphed_callables)
    monkeypatch.setattr(torch.cuda, "graph", lambda graph, stream=None: captured.append(stream) or _FakeGraph(stream))
    cache = graphs._GraphedAutogradPass([], max_graphs=1, warmup=1)
    with pytest.warns(UserWarning, match="capture of the training pass failed"):
        assert cache._graph(lambda x: (x,), [torch.zeros(2)], "the training pass") is None
    assert current[0] is main and len(captured) == 1 and captured[0].key[1] == 1
    assert cache.disabled_reason == "RuntimeError: operation not permitted when stream is capturing"


def test_data_module_pickles_and_copies_without_its_augmentation_graph():
    """A data module that augmented CUDA batches holds a CUDA graph and a stream, neither picklable: ``ddp_spawn`` and
    ``copy.deepcopy`` (a notebook) must still copy it; the copy captures its own graph at its first CUDA batches."""
    import pickle
    import threading

    from cdl_lightning.data import ContinualDataModule
    from cdl_lightning.data.synthetic import SyntheticShapes

    data = ContinualDataModule(source=SyntheticShapes(num_classes=4, train_per_class=4, test_per_class=2), num_tasks=2,
                               epochs_per_task=1, batch_size=4, eval_batch_size=4, image_size=32)
    data._train_batch_graphs = GraphedFunction(data._train_batch, max_graphs=1)
    data._train_batch_graphs.graphs["key"] = (threading.Lock(), ())  # stands for a captured graph: not picklable
    for copied in (copy.deepcopy(data), pickle.loads(pickle.dumps(data))):
        assert copied._train_batch_graphs is None and copied.cuda_graphs and copied.batch_size == 4
    assert data._train_batch_graphs.graphs  # the original keeps its graph


def _fake_cuda(monkeypatch) -> tuple[_FakeStream, list]:
    """The CUDA stream calls of `FastPaths.aside` on a fake device: the main stream, and the stream current while the
    pass runs (recorded in the returned list)."""
    main, current = _FakeStream(torch.device("cuda", 0), -1, 0), []
    monkeypatch.setattr(torch.cuda, "Stream", _FakePool())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current[-1] if current else main)

    class StreamContext:
        def __init__(self, stream):
            self.stream = stream

        def __enter__(self):
            current.append(self.stream)

        def __exit__(self, *args):
            current.pop()

    monkeypatch.setattr(torch.cuda, "stream", StreamContext)
    return main, current


class _FakeCudaTensor:
    device = torch.device("cuda", 0)

    def __init__(self) -> None:
        self.recorded = []

    def record_stream(self, stream) -> None:
        self.recorded.append(stream)


def test_aside_runs_beside_only_within_overlap_which_joins_on_leaving_even_on_error(monkeypatch):
    """`FastPaths.aside` queues its pass on the second stream only within `overlap` (a distiller's training step);
    elsewhere (a `training_step` of one's own that never joins) the pass runs at once, so its outputs are never read
    before they are written. Leaving the scope, by an error too, makes the main stream wait: nothing stays pending."""
    from cdl_lightning.models.fast_paths import FastPaths
    from cdl_lightning.nn import graphs

    main, current = _fake_cuda(monkeypatch)
    monkeypatch.setattr(graphs, "_held_streams", {})
    paths = FastPaths(side_stream=True)
    ran_on = []

    def teacher_pass():
        ran_on.append(current[-1] if current else main)
        return (_FakeCudaTensor(),)

    images = _FakeCudaTensor()
    paths.aside(teacher_pass, [images])  # outside `overlap`: the plain call, on the main stream
    assert ran_on == [main] and paths.streams == {} and paths._pending == [] and images.recorded == []
    with paths.overlap():
        out = paths.aside(teacher_pass, [images])
        side = paths.streams[images.device]
        assert ran_on[-1] is side and side != main and side.key[1] == 1  # the high-priority pool
        assert side.waited == [main] and images.recorded == [side] and out[0].recorded == [main]
        assert len(paths._pending) == 1
        paths.join()  # the learner's step, before its loss
        assert main.waited == ["event 0"] and paths._pending == []
    assert main.waited == ["event 0"]  # nothing left to wait for
    with pytest.raises(RuntimeError, match="between aside and join"), paths.overlap():
        paths.aside(teacher_pass, [images])
        with paths.overlap():  # a nested scope leaves the joining to the outer one
            pass
        assert len(paths._pending) == 1
        raise RuntimeError("between aside and join")
    assert main.waited == ["event 0", "event 1"] and paths._pending == [] and paths._overlap == 0


def test_autograd_graph_caches_keep_the_graphs_they_drop_until_reset():
    """The graphed prompt pass never destroys a graph mid-run (evicted, stale or after a failed capture): a destroyed
    graph frees its capture stream's cuBLAS workspace, which `make_graphed_callables` may share with the live
    training-pass graph (pytorch/pytorch#193402). `GraphedFunction`s (each graph on a stream of its own) and the
    training pass (rarely dropping one; keeping them would hold activations) drop them at once."""
    from cdl_lightning.nn.graphs import GraphedFunction, GraphedPromptPass, GraphedTrainingPass

    pool = torch.nn.Linear(2, 2)
    prompt_pass = GraphedPromptPass(pool, max_graphs=2, capture_after=1)
    graphs = iter(range(100))
    for task in range(4):  # one graph per task, two kept for replay
        assert prompt_pass._lookup(("task", task), lambda: f"graph {next(graphs)}") is not None
    assert [entry[0] for entry in prompt_pass.graphs.values()] == ["graph 2", "graph 3"]
    assert prompt_pass.retired == ["graph 0", "graph 1"]
    with torch.no_grad():
        pool.weight.set_(pool.weight.detach().clone())  # the storage moved: task 3's graph is re-captured
    prompt_pass._lookup(("task", 3), lambda: f"graph {next(graphs)}")
    assert prompt_pass.retired == ["graph 0", "graph 1", "graph 3"]
    with pytest.warns(UserWarning, match="capture of the prompt pass failed"):
        prompt_pass._disable(RuntimeError("capture failed"), "the prompt pass")
    assert prompt_pass.graphs == {} and prompt_pass.retired[-2:] == ["graph 2", "graph 4"]
    prompt_pass.reset()
    assert prompt_pass.retired == []
    assert not GraphedTrainingPass.retire_dropped and not GraphedFunction.retire_dropped
    function = GraphedFunction(lambda x: (x,), [pool], max_graphs=1, capture_after=1)
    for key in range(3):
        function._lookup(key, lambda: f"graph {next(graphs)}")
    assert function.retired == [] and len(function.graphs) == 1


def test_graphed_autograd_passes_run_a_partial_batch_eagerly():
    """An epoch's last, smaller batch is not captured (no capture and no second graph for a once-per-epoch step): the
    graphed training / prompt passes call it eagerly, and a full batch after it is graphed again."""
    from types import SimpleNamespace

    from cdl_lightning.nn.graphs import GraphedPromptPass, GraphedTrainingPass

    def batch(n):
        return [SimpleNamespace(is_cuda=True, requires_grad=True, shape=(n, 3)),
                SimpleNamespace(is_cuda=True, requires_grad=True, shape=(8, 2))]

    with mock.patch.object(torch.cuda, "is_current_stream_capturing", lambda: False):
        for runner in (GraphedTrainingPass(torch.nn.Linear(2, 2)), GraphedPromptPass(torch.nn.Linear(2, 2))):
            assert [runner.usable(batch(n)) for n in (64, 64, 8, 64, 16, 64)] == [True, True, False, True, False, True]
            assert runner.largest_batch == 64
            assert runner.usable(batch(128)) and not runner.usable(batch(64))  # a larger batch becomes the full one
            with torch.no_grad():
                assert not runner.usable(batch(128))  # autograd off: eager, as before


def test_compile_with_cuda_graphs_graphs_the_compiled_passes_and_the_plain_training_pass(tiny_vit_config):
    """``compile`` and ``cuda_graphs`` together: the gradient-free passes are still `GraphedFunction`s (which capture
    whatever the compiled ViT runs); the graphed training pass runs the ViT's plain forward, never the compiled call.
    ``compile`` without ``cuda_graphs``: no wrappers, as before."""
    from cdl_lightning.models import PromptLearner
    from cdl_lightning.models.fast_paths import PlainForward

    model = PromptLearner(backbone=tiny_vit_config, task_sizes=[2, 2], compile=True)
    model.configure_model()  # compile_: lazy, nothing compiles before a call
    vit = model.classifier.backbone
    compiled_calls = []
    vit._compiled_call_impl = lambda *args, **kwargs: compiled_calls.append(args) or vit.forward(*args, **kwargs)
    paths = model.fast_paths
    fn = lambda images: (images,)  # noqa: E731
    assert isinstance(model.graphed("x", fn, [vit]), GraphedFunction)
    with mock.patch.object(torch, "is_autocast_enabled", lambda device_type=None: device_type == "cuda"):
        runner = paths.training_pass(vit, on_cuda=True)
    assert isinstance(runner, GraphedTrainingPass) and isinstance(runner.vit, PlainForward) and runner.vit.vit is vit
    assert [id(p) for p in runner.vit.parameters()] == [id(p) for p in vit.parameters()]  # the storage check's
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    pk, pv = (torch.randn(1, 4, vit.embed_dim, requires_grad=True) for _ in range(2))
    out = runner(images, {1: (pk, pv)}, return_blocks=True)  # CPU: the pass runs eagerly, through the plain forward
    assert compiled_calls == []
    expected = vit(images, {1: (pk, pv)}, return_blocks=True)
    assert len(compiled_calls) == 1  # the module's own call goes through the compiled one
    assert torch.equal(out.tokens, expected.tokens) and len(out.blocks) == vit.depth
    # compile alone: every pass compiled, none graphed
    alone = PromptLearner(backbone=tiny_vit_config, task_sizes=[2, 2], compile=True, cuda_graphs=False).fast_paths
    assert alone.graphed("x", fn, [vit]) is fn
    with mock.patch.object(torch, "is_autocast_enabled", lambda device_type=None: device_type == "cuda"):
        assert alone.training_pass(vit, on_cuda=True) is None
    # graphs without compile: the training pass graphs the ViT itself
    with mock.patch.object(torch, "is_autocast_enabled", lambda device_type=None: device_type == "cuda"):
        assert PromptLearner(backbone=tiny_vit_config, task_sizes=[2, 2]).fast_paths.training_pass(vit, True).vit is vit
    # compile_training_pass (experimental): the graphed training pass runs the compiled call
    paths.runners.clear()
    paths.compile_training_pass = True
    with mock.patch.object(torch, "is_autocast_enabled", lambda device_type=None: device_type == "cuda"):
        runner = paths.training_pass(vit, on_cuda=True)
    assert runner.vit is vit and "compile_training_pass=True" in repr(paths)
    runner(images, {1: (pk, pv)}, return_blocks=True)
    assert len(compiled_calls) == 2


class _FakeCUDAGraph:
    def __init__(self) -> None:
        self.replays = 0

    def replay(self) -> None:
        self.replays += 1


def _fake_graphed_calls(monkeypatch, in_capture: list) -> None:
    """`GraphedFunction`'s whole call path on CPU tensors: usable, captured on a fake device (``in_capture`` gets
    ``True`` / ``False`` as the fake capture starts and ends), replayed by a fake graph (the capture's outputs)."""
    current = [_FakeStream(torch.device("cpu"), -1, 0)]

    class _Capture(_FakeGraph):
        def __enter__(self) -> None:
            in_capture.append(True)

        def __exit__(self, *args) -> None:
            in_capture.append(False)

    _fake_capture_device(monkeypatch, current)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _FakeCUDAGraph)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: _FakeGraph(stream))
    monkeypatch.setattr(torch.cuda, "graph", lambda graph, stream=None: _Capture(stream))
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device=None: torch.zeros(16, dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device=None: None)
    monkeypatch.setattr(GraphedFunction, "usable", lambda self, tensors: not torch.is_grad_enabled())


def test_a_compiled_graphed_function_compiles_before_capture_never_under_it(monkeypatch):
    """``torch.compile`` guards on the autocast state, its cast-cache flag included, which capture turns off
    (`_capture_autocast`): the eager call before a signature's capture and the warm-up calls run under that state, so
    the compiled code they leave is what the capture runs, and a new input shape recompiles in its eager first call
    (torch 2.14.1 refuses to compile under capture; older releases would compile there). Counted with dynamo's
    compile counter on the fake device."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("eager")
    weight = torch.randn(8, 8, generator=torch.Generator().manual_seed(0))

    @torch.compile(backend=counter)
    def layer(x: torch.Tensor) -> tuple[torch.Tensor]:
        return (torch.nn.functional.gelu(torch.nn.functional.layer_norm(x @ weight, (8,))),)

    in_capture: list[bool] = []
    compiles_at: list[tuple[bool, int]] = []
    _fake_graphed_calls(monkeypatch, in_capture)
    original = layer

    def recorded(x: torch.Tensor) -> tuple[torch.Tensor]:
        before = counter.frame_count
        out = original(x)
        compiles_at.append((bool(in_capture and in_capture[-1]), counter.frame_count - before))
        return out

    graphed = GraphedFunction(recorded, warmup=2)
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        outs = [graphed(x)[0] for _ in range(3)]  # eager (compiles), capture (warm-up x2, capture) + replay, replay
        assert counter.frame_count == 1 and compiles_at == [(False, 1), (False, 0), (False, 0), (True, 0)]
        graphed(x[:2])
        graphed(x[:2])  # a new batch size: recompiled in its eager first call, then captured
    assert compiles_at[4:] == [(False, 1), (False, 0), (False, 0), (True, 0)] and counter.frame_count == 2
    assert graphed.captures == 2 and graphed.replays == 3 and graphed.disabled_reason is None
    expected = torch.nn.functional.gelu(torch.nn.functional.layer_norm(x @ weight, (8,)))
    assert all(torch.equal(out, expected) for out in outs)
    torch._dynamo.reset()


@pytest.mark.slow  # torch.compile (inductor): about a minute of compilation on 2 cores
def test_compiled_learner_passes_through_graphed_functions_match_eager(monkeypatch, tiny_vit_config):
    """A learner with ``compile`` and ``cuda_graphs``: its query and evaluation passes, inductor-compiled, go through
    `GraphedFunction`s (a fake device on CPU: eager first call, warm-up, capture, replay) with no compilation under
    capture, and give the eager learner's numbers within float rounding."""
    import functools

    from torch._dynamo.utils import counters

    from cdl_lightning.models import PromptLearner
    from cdl_lightning.nn import CodaPrompt

    torch._dynamo.reset()
    coda = functools.partial(CodaPrompt, pool_size=8, layers=(0, 1))
    torch.manual_seed(0)
    eager = PromptLearner(backbone=tiny_vit_config, prompt=coda, task_sizes=[2, 2], cuda_graphs=False).eval()
    torch.manual_seed(0)
    model = PromptLearner(backbone=tiny_vit_config, prompt=coda, task_sizes=[2, 2], compile=True).eval()
    model.configure_model()
    in_capture: list[bool] = []
    _fake_graphed_calls(monkeypatch, in_capture)
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    graphs_at_capture = []  # (at its start, at its end) the graphs dynamo compiled so far, per capture

    class Capture(_FakeGraph):
        def __enter__(self) -> None:
            graphs_at_capture.append(counters["stats"]["unique_graphs"])

        def __exit__(self, *args) -> None:
            graphs_at_capture[-1] = (graphs_at_capture[-1], counters["stats"]["unique_graphs"])

    monkeypatch.setattr(torch.cuda, "graph", lambda graph, stream=None: Capture(stream))
    with torch.no_grad():
        queries = [model.query(images) for _ in range(3)]
        logits = [model(images, 1) for _ in range(3)]
        expected_query, expected_logits = eager.query(images), eager(images, 1)
    assert {name: (r.captures, r.replays, r.disabled_reason) for name, r in model.graph_runners.items()} == {
        "query": (1, 2, None), "logits": (1, 2, None)}
    assert len(graphs_at_capture) == 2 and all(start == end > 0 for start, end in graphs_at_capture)
    assert graphs_at_capture[-1][1] == counters["stats"]["unique_graphs"]  # and nothing compiled after the captures
    for query in queries:
        torch.testing.assert_close(query, expected_query, rtol=1e-4, atol=1e-5)
    for logit in logits:
        torch.testing.assert_close(logit, expected_logits, rtol=1e-4, atol=1e-5)
    compiled = counters["stats"]["unique_graphs"]
    with torch.no_grad():  # a smaller batch (an evaluation's last): a capture of its own, padded into the compiled size
        remainders = [model(images[:3], 1) for _ in range(3)]
    assert model.graph_runners["logits"].captures == 2 and len(graphs_at_capture) == 3
    assert counters["stats"]["unique_graphs"] == compiled  # nothing compiled for it (`BatchPadding`)
    for logit in remainders:
        torch.testing.assert_close(logit, expected_logits[:3], rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()
