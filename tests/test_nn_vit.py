"""PromptedViT, prefix attention, extra tokens, input normalisation and backbone creation (`cdl_lightning.nn.vit`)."""

from __future__ import annotations

import math

import pytest
import timm
import torch

from cdl_lightning.nn import BackboneConfig, OfflineWeightsError, PromptedViT, create_vit
from cdl_lightning.nn.vit import merge_prefixes, prefix_attention, prefix_block

TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=2)
NUM_TOKENS = 1 + (32 // 8) ** 2  # CLS + 16 patches
WIDTH, DEPTH = 64, 4


@pytest.fixture
def vit(tiny_vit_config) -> PromptedViT:
    torch.manual_seed(0)
    return tiny_vit_config.build()


@pytest.fixture
def images() -> torch.Tensor:
    return torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def plain_attention(attn, x: torch.Tensor, pk: torch.Tensor, pv: torch.Tensor) -> torch.Tensor:
    """softmax(q [Pk; K]^T / sqrt(d)) [Pv; V] per head, written out with explicit matrix products."""
    batch, _, dim = x.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    qkv = x @ attn.qkv.weight.T + (attn.qkv.bias if attn.qkv.bias is not None else 0)
    q, k, v = qkv[..., :dim], qkv[..., dim : 2 * dim], qkv[..., 2 * dim :]
    k = torch.cat([pk.expand(batch, -1, -1), k], dim=1)
    v = torch.cat([pv.expand(batch, -1, -1), v], dim=1)
    outs = []
    for h in range(heads):
        cols = slice(h * head_dim, (h + 1) * head_dim)
        scores = q[..., cols] @ k[..., cols].transpose(1, 2) / math.sqrt(head_dim)
        outs.append(torch.softmax(scores, dim=-1) @ v[..., cols])
    out = torch.cat(outs, dim=-1)
    return out @ attn.proj.weight.T + attn.proj.bias


def plain_block(block, x: torch.Tensor, pk: torch.Tensor, pv: torch.Tensor) -> torch.Tensor:
    x = x + plain_attention(block.attn, block.norm1(x), pk, pv)
    return x + block.mlp(block.norm2(x))


def capture_norm_pre(vit: PromptedViT, **kwargs) -> tuple[torch.Tensor, object]:
    """The token sequence entering the blocks (the input of ``norm_pre``) and the forward output."""
    captured = []
    handle = vit.vit.norm_pre.register_forward_pre_hook(lambda module, args: captured.append(args[0].detach().clone()))
    try:
        out = vit(**kwargs)
    finally:
        handle.remove()
    assert len(captured) == 1
    return captured[0], out


def embedded(vit: PromptedViT, images: torch.Tensor) -> torch.Tensor:
    """CLS + patch tokens with the positional embedding, as timm builds them."""
    return vit.vit._pos_embed(vit.vit.patch_embed(vit.normalize(images)))


# ------------------------------------------------------------------------------------------------------ plain path
def test_no_prompts_is_bit_identical_to_forward_features(vit, images):
    out = vit(images)
    assert torch.equal(out.tokens, vit.vit.forward_features(vit.normalize(images)))
    assert out.tokens.shape == (3, NUM_TOKENS, WIDTH)
    assert out.blocks == []
    assert torch.equal(vit.query(images), vit.vit.forward_features(vit.normalize(images))[:, 0])


def test_build_is_frozen_and_eval(tiny_vit_config):
    vit = tiny_vit_config.build()
    assert not vit.training and not any(m.training for m in vit.modules())
    assert not any(p.requires_grad for p in vit.parameters())
    assert vit.embed_dim == WIDTH and vit.depth == DEPTH and vit.num_prefix_tokens == 1


def test_rejects_non_token_pool():
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=0, global_pool="avg", **TINY)
    with pytest.raises(ValueError, match="global_pool"):
        PromptedViT(vit)


# ------------------------------------------------------------------------------------------------ prefix attention
@pytest.mark.parametrize("prefix_batch", [1, 3])
def test_prefix_attention_matches_plain_math(vit, prefix_batch):
    torch.manual_seed(2)
    attn = vit.vit.blocks[1].attn
    x = torch.randn(3, NUM_TOKENS, WIDTH)
    pk, pv = torch.randn(prefix_batch, 5, WIDTH), torch.randn(prefix_batch, 5, WIDTH)
    got = prefix_attention(attn, x, (pk, pv))
    want = plain_attention(attn, x, pk, pv)
    assert got.shape == x.shape  # queries only from the real tokens
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_prefix_attention_with_empty_prefix_is_plain_attention(vit):
    torch.manual_seed(3)
    attn = vit.vit.blocks[0].attn
    x = torch.randn(2, NUM_TOKENS, WIDTH)
    empty = torch.zeros(1, 0, WIDTH)
    torch.testing.assert_close(prefix_attention(attn, x, (empty, empty)), attn(x), atol=1e-6, rtol=0)


def test_prefix_block_matches_plain_math(vit):
    torch.manual_seed(4)
    block = vit.vit.blocks[2]
    x = torch.randn(2, NUM_TOKENS, WIDTH)
    pk, pv = torch.randn(2, 4, WIDTH), torch.randn(2, 4, WIDTH)
    torch.testing.assert_close(prefix_block(block, x, (pk, pv)), plain_block(block, x, pk, pv), atol=1e-5, rtol=0)


def test_forward_applies_prefix_at_its_layer(vit, images):
    torch.manual_seed(5)
    pk, pv = torch.randn(3, 4, WIDTH), torch.randn(3, 4, WIDTH)
    plain = vit(images, return_blocks=True)
    out = vit(images, prefixes={2: (pk, pv)}, return_blocks=True)
    assert out.tokens.shape == plain.tokens.shape == (3, NUM_TOKENS, WIDTH)  # sequence length unchanged
    # blocks before the prompted one are untouched, the prompted one matches the plain math, later ones follow
    assert torch.equal(out.blocks[0], plain.blocks[0]) and torch.equal(out.blocks[1], plain.blocks[1])
    blocks = vit.vit.blocks
    x2 = plain_block(blocks[2], plain.blocks[1], pk, pv)
    torch.testing.assert_close(out.blocks[2], x2, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.tokens, vit.vit.norm(blocks[3](x2)), atol=1e-5, rtol=0)
    assert (out.tokens - plain.tokens).abs().max() > 1e-3  # the prefix changes the output


def test_return_blocks_gives_every_block(vit, images):
    out = vit(images, return_blocks=True)
    assert len(out.blocks) == DEPTH
    x = embedded(vit, images)
    for i, block in enumerate(vit.vit.blocks):
        x = block(x)
        assert torch.equal(out.blocks[i], x)
    assert torch.equal(out.tokens, vit.vit.norm(out.blocks[-1]))


def test_merge_prefixes_concatenates_and_broadcasts():
    a = (torch.randn(1, 2, 8), torch.randn(1, 2, 8))
    b = (torch.randn(3, 4, 8), torch.randn(3, 4, 8))
    c = (torch.randn(1, 1, 8), torch.randn(1, 1, 8))
    merged = merge_prefixes({0: a, 1: a}, None, {1: b, 2: c})
    assert set(merged) == {0, 1, 2}
    assert merged[0] is a and merged[2] is c
    keys, values = merged[1]
    assert keys.shape == values.shape == (3, 6, 8)
    assert torch.equal(keys, torch.cat([a[0].expand(3, -1, -1), b[0]], 1))
    assert torch.equal(values, torch.cat([a[1].expand(3, -1, -1), b[1]], 1))


# -------------------------------------------------------------------------------------------------- extra tokens
def test_append_goes_last_without_positional_embedding(vit, images):
    torch.manual_seed(6)
    token = torch.randn(1, 1, WIDTH)
    seq, out = capture_norm_pre(vit, images=images, append=token)
    assert seq.shape == (3, NUM_TOKENS + 1, WIDTH)
    assert torch.equal(seq[:, :NUM_TOKENS], embedded(vit, images))  # CLS and patches as timm makes them
    assert torch.equal(seq[:, -1], token[0, 0].expand(3, -1))  # the raw token: no positional embedding
    assert out.tokens.shape == (3, NUM_TOKENS + 1, WIDTH)
    torch.testing.assert_close(out.tokens, vit.vit.norm(vit.vit.blocks(seq)), atol=0, rtol=0)
    # the class token still sits at 0 and now sees the extra token
    assert (out.tokens[:, 0] - vit(images).tokens[:, 0]).abs().max() > 1e-4


def test_per_sample_append(vit, images):
    tokens = torch.randn(3, 2, WIDTH)
    seq, _ = capture_norm_pre(vit, images=images, append=tokens)
    assert torch.equal(seq[:, -2:], tokens)


def test_prepend_goes_first_and_class_token_moves_to_1(vit, images):
    torch.manual_seed(7)
    token = torch.randn(1, 1, WIDTH)
    seq, out = capture_norm_pre(vit, images=images, prepend=token)
    assert seq.shape == (3, NUM_TOKENS + 1, WIDTH)
    assert torch.equal(seq[:, 0], token[0, 0].expand(3, -1))  # no positional embedding
    cls = (vit.vit.cls_token + vit.vit.pos_embed[:, :1])[0, 0]
    assert torch.equal(seq[:, 1], cls.expand(3, -1))
    assert torch.equal(seq[:, 1:], embedded(vit, images))
    torch.testing.assert_close(out.tokens, vit.vit.norm(vit.vit.blocks(seq)), atol=0, rtol=0)


def test_prepend_and_append_with_prefixes_keep_order(vit, images):
    first, last = torch.randn(1, 1, WIDTH), torch.randn(1, 1, WIDTH)
    prefix = (torch.randn(1, 2, WIDTH), torch.randn(1, 2, WIDTH))
    seq, out = capture_norm_pre(vit, images=images, prepend=first, append=last, prefixes={0: prefix})
    assert out.tokens.shape == (3, NUM_TOKENS + 2, WIDTH)
    assert torch.equal(seq[:, 0], first[0, 0].expand(3, -1)) and torch.equal(seq[:, -1], last[0, 0].expand(3, -1))


# ------------------------------------------------------------------------------------------------ input norm
def test_input_norm_timm_vs_none_differ_exactly_by_normalisation(vit, images):
    timm_norm = PromptedViT(vit.vit, input_norm="timm")
    no_norm = PromptedViT(vit.vit, input_norm="none")
    cfg = vit.vit.pretrained_cfg
    mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    assert torch.equal(timm_norm.mean, mean) and torch.equal(timm_norm.std, std)
    assert torch.equal(no_norm.normalize(images), images)
    normalised = (images - mean) / std
    assert torch.equal(timm_norm.normalize(images), normalised)
    assert torch.equal(timm_norm(images).tokens, no_norm(normalised).tokens)
    assert torch.equal(timm_norm.query(images), no_norm.query(normalised))
    assert (timm_norm(images).tokens - no_norm(images).tokens).abs().max() > 1e-3


def test_backbone_config_input_norm_none(tiny_vit_config, images):
    torch.manual_seed(0)
    with_norm = tiny_vit_config.build()
    torch.manual_seed(0)
    tiny_vit_config.input_norm = "none"
    without = tiny_vit_config.build()
    assert without.input_norm == "none"
    assert torch.equal(without(with_norm.normalize(images)).tokens, with_norm(images).tokens)


# ------------------------------------------------------------------------------------------------ create_vit
def test_missing_checkpoint_path_raises(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        create_vit("vit_tiny_patch16_224", checkpoint_path=str(missing), model_kwargs=TINY)


def test_missing_checkpoint_message_names_the_model(tmp_path):
    # BUG (vit.py:202-203): the second string literal lacks the ``f`` prefix, so the message ends with the literal
    # text "for {name!r}" instead of the model's name.
    with pytest.raises(FileNotFoundError) as err:
        create_vit("vit_tiny_patch16_224", checkpoint_path=str(tmp_path / "nope.pth"), model_kwargs=TINY)
    assert "{name!r}" not in str(err.value)
    assert "'vit_tiny_patch16_224'" in str(err.value)


def test_pretrained_offline_raises_offline_weights_error(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable at import: set the constant too, so nothing tries the network
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OfflineWeightsError, match="checkpoint_path") as err:
        create_vit("vit_tiny_patch16_224.augreg_in21k_ft_in1k", pretrained=True, model_kwargs=TINY)
    assert err.value.__cause__ is not None
    with pytest.raises(OfflineWeightsError):
        BackboneConfig(name="vit_tiny_patch16_224.augreg_in21k_ft_in1k", pretrained=True, model_kwargs=TINY).build()


def test_local_checkpoint_reproduces_weights(tmp_path, images):
    torch.manual_seed(11)
    source = create_vit("vit_tiny_patch16_224", model_kwargs=TINY)
    path = tmp_path / "tiny.pth"
    torch.save(source.state_dict(), path)
    torch.manual_seed(12)  # a different random init, overwritten by the file
    loaded = create_vit("vit_tiny_patch16_224", checkpoint_path=str(path), model_kwargs=TINY)
    want, got = source.state_dict(), loaded.state_dict()
    assert set(want) == set(got)
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name
    built = BackboneConfig(name="vit_tiny_patch16_224", checkpoint_path=str(path), model_kwargs=TINY).build()
    assert torch.equal(built(images).tokens, PromptedViT(source.eval())(images).tokens)
