"""`BatchPadding`: a smaller batch runs padded to a batch size the pass already ran at; `FastPaths.compile_` uses it
so that a compiled ViT pass compiles once per full batch size, with static shapes."""

from __future__ import annotations

import functools

import pytest
import torch

from cdl_lightning.models import PromptLearner
from cdl_lightning.models.fast_paths import RECOMPILE_LIMIT
from cdl_lightning.nn.batch_padding import BatchPadding
from cdl_lightning.nn.prompts import CodaPrompt, DualPrompt
from cdl_lightning.nn.vit import ViTOutput


def _rowwise(images, prefixes=None, shared=None):
    """A pass whose samples do not interact; records the batch size it ran at."""
    _rowwise.seen.append(images.shape[0])
    x = images.flatten(1).sin()
    if prefixes:
        x = x + sum(k.sum((1, 2))[:, None] * v.sum((1, 2))[:, None] for k, v in prefixes.values())
    if shared is not None:
        x = x * shared.sum()
    return ViTOutput(tokens=x[:, None, :], blocks=[x, 2 * x])


def test_smaller_batches_run_padded_and_come_back_cut_and_equal():
    _rowwise.seen = []
    padded = BatchPadding(_rowwise)
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(6, 3, 2, 2, generator=gen)
    prefixes = {0: (torch.rand(6, 2, 4, generator=gen), torch.rand(6, 2, 4, generator=gen))}
    shared = torch.rand(1, 3, generator=gen)

    full = padded(images[:4], prefixes={0: tuple(p[:4] for p in prefixes[0])}, shared=shared)
    assert full.tokens.shape == (4, 1, 12) and padded.sizes == {4} and padded.padded_calls == 0
    for batch in (3, 1):  # smaller: padded to 4, cut back, same numbers as unpadded
        out = padded(images[:batch], prefixes={0: tuple(p[:batch] for p in prefixes[0])}, shared=shared)
        alone = _rowwise(images[:batch], {0: tuple(p[:batch] for p in prefixes[0])}, shared)
        assert out.tokens.shape == (batch, 1, 12) and [b.shape[0] for b in out.blocks] == [batch, batch]
        torch.testing.assert_close(out.tokens, alone.tokens, rtol=0, atol=0)
        torch.testing.assert_close(out.blocks[1], alone.blocks[1], rtol=0, atol=0)
    assert _rowwise.seen == [4, 4, 3, 4, 1] and padded.padded_calls == 2
    padded(images)  # larger than any size seen: runs as itself (a new compile for a compiled pass)
    padded(images[:5])  # padded to the smallest size >= 5
    padded(images[:2])  # padded to 4, not 6
    assert _rowwise.seen[-3:] == [6, 6, 4] and padded.sizes == {4, 6} and padded.padded_calls == 4
    assert repr(padded).endswith("sizes=[4, 6])")


def test_gradients_reach_the_real_rows_only_and_match_the_unpadded_pass():
    weight = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    calls = []

    def layer(x, bias):
        calls.append(x.shape[0])
        return torch.tanh(x @ weight + bias), x.sum()  # a batch-less output is returned as computed (padded rows: 0)

    padded = BatchPadding(layer)
    padded(torch.rand(8, 5), torch.zeros(8, 3))
    x = torch.rand(3, 5, generator=torch.Generator().manual_seed(1), requires_grad=True)
    bias = torch.rand(3, 3, generator=torch.Generator().manual_seed(2), requires_grad=True)
    out, total = padded(x, bias)
    assert calls == [8, 8] and out.shape == (3, 3) and total.shape == ()
    (out.square().sum() + total).backward()
    grads = (x.grad.clone(), bias.grad.clone())
    x.grad = bias.grad = None
    ref, ref_total = layer(x, bias)
    (ref.square().sum() + ref_total).backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(grads, (x.grad, bias.grad))


PROMPTS = {
    "coda": functools.partial(CodaPrompt, pool_size=8, layers=(0, 1)),
    # its g-prompt is broadcast over the batch (first dimension 1): stays so in a padded batch of 1
    "dualprompt": functools.partial(DualPrompt, g_length=2, g_layers=(0,), pool_size=3, e_length=4, e_layers=(1, 2)),
}


@pytest.fixture
def counted_compile(monkeypatch):
    """``torch.compile`` with dynamo's compile counter as its backend (the eager backend: the frames dynamo compiles,
    no inductor); yields the counter and the ``dynamic`` argument of each call."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("eager")
    dynamic = []
    compile_ = torch.compile

    def counted(fn, **kwargs):
        dynamic.append(kwargs.get("dynamic"))
        return compile_(fn, backend=counter, **kwargs)

    monkeypatch.setattr(torch, "compile", counted)
    yield counter, dynamic
    torch._dynamo.reset()


@pytest.mark.parametrize("prompt", sorted(PROMPTS))
def test_compiled_vit_passes_compile_once_per_full_batch_size(counted_compile, tiny_vit_config, prompt):
    """``compile=True``: the prompted forward and the query pass are compiled with static shapes and wrapped in
    `BatchPadding`, so an evaluation remainder (any smaller batch) reuses the full batch's compile and a larger batch
    compiles for itself; dynamo's recompile limit is at least `RECOMPILE_LIMIT`. Counted with dynamo's compile
    counter."""
    counter, dynamic = counted_compile
    model = PromptLearner(backbone=tiny_vit_config, prompt=PROMPTS[prompt], task_sizes=[2, 2], compile=True,
                          cuda_graphs=False).eval()
    eager = PromptLearner(backbone=tiny_vit_config, prompt=PROMPTS[prompt], task_sizes=[2, 2], cuda_graphs=False).eval()
    eager.load_state_dict(model.state_dict())
    model.configure_model()
    assert dynamic == [False, False]  # the prompted forward, the query pass
    assert torch._dynamo.config.recompile_limit >= RECOMPILE_LIMIT
    images = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(images[:4], 1)
        frames = counter.frame_count
        assert frames == 2  # the query pass, the prompted forward
        for batch in (3, 1, 2):  # remainders: padded to 4, nothing recompiles
            torch.testing.assert_close(model(images[:batch], 1), eager(images[:batch], 1), rtol=1e-5, atol=1e-6)
        assert counter.frame_count == frames
        model(images, 1)  # a larger batch: its own static compile of each pass
        assert counter.frame_count == 2 * frames
        torch.testing.assert_close(model(images[:5], 1), eager(images[:5], 1), rtol=1e-5, atol=1e-6)
        assert counter.frame_count == 2 * frames
    vit = model.classifier.backbone
    for padded in (vit._compiled_call_impl, vit.query_pass):
        assert padded.sizes == {4, 6} and padded.padded_calls == 4


def test_arguments_broadcast_over_the_batch_stay_broadcast_in_the_first_calls_layout():
    """What held the batch, and in which strides, comes from the first call at the padded size: a (1, ...) token that
    was broadcast there is not padded for a batch of 1, and a batch-holding view keeps its strides."""
    calls = []

    def fn(x, token, kv):
        calls.append((x.shape, token.shape, kv.stride()))
        return x + token + kv.sum(-1, keepdim=True)

    padded = BatchPadding(fn)
    kv = torch.rand(4, 2, 6)[..., :3]  # a view: strides (12, 6, 1)
    token = torch.rand(1, 2, 1)
    padded(torch.rand(4, 2, 1), token, kv)
    x = torch.rand(1, 2, 1)
    out = padded(x, token, kv[:1].contiguous())  # contiguous (6, 3, 1) here: padded in the first call's strides
    assert calls[-1] == ((4, 2, 1), (1, 2, 1), (12, 6, 1))
    torch.testing.assert_close(out, x + token + kv[:1].sum(-1, keepdim=True))


def test_sizes_known_up_front_run_as_themselves():
    seen = []
    padded = BatchPadding(lambda x: seen.append(x.shape[0]) or x * 2, sizes=(8, 4))
    for batch in (8, 4, 3, 6, 8, 9, 5):
        assert padded(torch.ones(batch, 2)).shape == (batch, 2)
    assert seen == [8, 4, 4, 8, 8, 9, 8] and padded.sizes == {4, 8, 9} and padded.padded_calls == 3


def test_the_learner_passes_its_data_modules_batch_sizes(tiny_vit_config):
    from types import SimpleNamespace

    model = PromptLearner(backbone=tiny_vit_config, task_sizes=[2, 2], compile=True, cuda_graphs=False)
    assert model._loader_batch_sizes() == ()  # no trainer
    model._trainer = SimpleNamespace(datamodule=SimpleNamespace(batch_size=64, eval_batch_size=32))
    assert model._loader_batch_sizes() == (64, 32)
    model._trainer = SimpleNamespace(datamodule=None)  # dataloaders given to fit directly
    assert model._loader_batch_sizes() == ()


def test_calls_without_a_batched_tensor_run_as_they_are():
    padded = BatchPadding(lambda x, scale=1.0: x * scale)
    assert padded(3, scale=2.0) == 6.0 and padded.sizes == set()
    assert padded(torch.tensor(2.0)).item() == 2.0 and padded.sizes == set()  # a 0-d tensor has no batch
    padded(torch.ones(4, 2))
    out = padded(torch.ones(0, 2))  # an empty batch runs as itself and is no known size
    assert out.shape == (0, 2) and padded.padded_calls == 0 and padded.sizes == {4}


def test_a_copied_or_pickled_compiled_learner_runs_its_own_weights(counted_compile, tiny_vit_config):
    """The compiled passes read the ViT they were compiled from: a deep copy (or an unpickled model) drops them, as
    ``nn.Module.compile``'s own compiled call is dropped, and runs its own weights eagerly until compiled again."""
    import copy
    import pickle

    model = PromptLearner(backbone=tiny_vit_config, prompt=PROMPTS["coda"], task_sizes=[2, 2], compile=True,
                          cuda_graphs=False).eval()
    model.configure_model()
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        query = model.query(images)
        for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
            vit = other.classifier.backbone
            assert vit.query_pass is None and vit._compiled_call_impl is None
            torch.testing.assert_close(other.query(images), query, rtol=0, atol=0)
            vit.vit.norm.weight.mul_(2)  # the copy's own weights change its query, not the original's
            assert not torch.allclose(other.query(images), query)
        torch.testing.assert_close(model.query(images), query, rtol=0, atol=0)
    assert model.classifier.backbone.query_pass is not None
