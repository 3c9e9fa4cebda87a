"""PromptedClassifier: frozen backbone, query encoder, heads and one training step (`cdl_lightning.nn.classifier`)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cdl_lightning.nn import L2P, BackboneConfig, CodaPrompt, DualPrompt, PromptedClassifier
from cdl_lightning.nn.losses import mask_past_classes
from cdl_lightning.nn.vit import merge_prefixes


def backbone(width: int = 64, depth: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    kwargs = dict(img_size=32, patch_size=8, embed_dim=width, depth=depth, num_heads=2)
    return BackboneConfig(name="vit_tiny_patch16_224", model_kwargs=kwargs).build()


@pytest.fixture
def images() -> torch.Tensor:
    return torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_linear_probe_reads_class_token(images):
    vit = backbone()
    model = PromptedClassifier(vit, num_classes=8)
    out = model(images, task=0, train=False)
    tokens = vit(images).tokens
    assert torch.equal(out.tokens, tokens)
    assert torch.equal(out.features, tokens[:, 0])
    assert torch.equal(out.logits, model.head(tokens[:, 0]))
    assert out.logits.shape == (4, 8)
    assert out.prompt_loss.item() == 0.0 and out.prompt_loss.shape == ()
    assert set(model.trainable_state()) == {"head.weight", "head.bias"}


def test_prompted_forward_equals_backbone_with_prompt_prefixes(images):
    vit = backbone()
    torch.manual_seed(1)
    prompt = L2P(64, 64, 2, pool_size=6, length=4, top_k=2, layers=(0, 2))
    model = PromptedClassifier(vit, 8, prompt=prompt)
    query = vit.query(images)
    assert torch.equal(model.query(images), query)
    out = model(images, task=0, train=False)
    prompt_out = prompt(query, 0, False)
    want = vit(images, prompt_out.prefixes).tokens
    assert torch.equal(out.tokens, want)
    assert torch.equal(out.logits, model.head(want[:, 0]))
    assert torch.equal(out.prompt_loss, prompt_out.loss)
    # extra prefixes are merged after the prompt's own rows
    extra = {2: (torch.randn(1, 3, 64), torch.randn(1, 3, 64))}
    merged = vit(images, merge_prefixes(prompt_out.prefixes, extra)).tokens
    assert torch.equal(model(images, 0, False, prefixes=extra).tokens, merged)


def test_prepended_tokens_shift_the_class_token(images):
    model = PromptedClassifier(backbone(), 8)
    prepend = torch.randn(1, 2, 64)
    out = model(images, 0, False, prepend=prepend)
    assert out.tokens.shape == (4, 17 + 2, 64)
    assert torch.equal(out.features, out.tokens[:, 2])
    assert torch.equal(out.logits, model.head(out.tokens[:, 2]))


def test_separate_query_encoder(images):
    """The reference's choice: a teacher of width 64 takes its query from a width-32 (student-architecture) ViT."""
    teacher_vit, student_vit = backbone(64, 4, seed=0), backbone(32, 3, seed=1)
    prompt = L2P(64, 32, 2, pool_size=6, length=4, top_k=2)
    model = PromptedClassifier(teacher_vit, 8, prompt=prompt, query_encoder=student_vit)
    assert model.query_dim == 32
    assert torch.equal(model.query(images), student_vit.query(images))
    out = model(images, 0, False)
    want = teacher_vit(images, prompt(student_vit.query(images), 0, False).prefixes).tokens
    assert torch.equal(out.tokens, want)
    assert model.frozen_modules() == [teacher_vit, student_vit]
    # the same encoder as the backbone is not stored twice
    assert PromptedClassifier(teacher_vit, 8, query_encoder=teacher_vit).query_encoder is None


@pytest.mark.parametrize("kind", ["l2p", "dual", "coda"])
def test_train_step_leaves_backbone_untouched(images, kind):
    vit = backbone()
    query_vit = backbone(seed=5)
    torch.manual_seed(2)
    prompt = {
        "l2p": lambda: L2P(64, 64, 2, pool_size=6, length=4, top_k=2),
        "dual": lambda: DualPrompt(64, 64, 2, pool_size=2, e_length=4, e_layers=(2, 3)),
        "coda": lambda: CodaPrompt(64, 64, 2, pool_size=10, length=4, layers=(0, 1)),
    }[kind]()
    model = PromptedClassifier(vit, 8, prompt=prompt, query_encoder=query_vit)
    prompt.start_task(1)  # CODA draws task 1's components here (its zero slice would get no gradient)
    model.train()
    assert model.training and model.prompt.training and model.head.training
    for frozen in (vit, query_vit):
        assert not any(m.training for m in frozen.modules())
        assert not any(p.requires_grad for p in frozen.parameters())
    frozen_before = {k: v.clone() for k, v in {**vit.state_dict(), **query_vit.state_dict()}.items()}
    trainable_before = model.trainable_state()
    assert all(not name.startswith(("backbone.", "query_encoder.")) for name in trainable_before)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    targets = torch.tensor([4, 5, 6, 7])
    out = model(images, task=1, train=True)
    loss = F.cross_entropy(mask_past_classes(out.logits, 4, 8), targets) + out.prompt_loss
    loss.backward()
    optimizer.step()
    frozen_after = {**vit.state_dict(), **query_vit.state_dict()}
    for name, tensor in frozen_before.items():
        assert torch.equal(frozen_after[name], tensor), name
    assert all(p.grad is None for p in vit.parameters())
    after = model.trainable_state()
    assert not torch.equal(after["head.weight"], trainable_before["head.weight"])
    changed = [n for n in after if n.startswith("prompt.") and not torch.equal(after[n], trainable_before[n])]
    assert changed, "no prompt parameter was updated"
    model.eval()
    model.train(True)
    assert not vit.training and not query_vit.training
