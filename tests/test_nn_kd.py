"""Distillation methods with real (tiny) prompted students and teachers, against hand computations (`nn.kd`)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cdl_lightning.nn import (
    DKD,
    KDP,
    L2P,
    BackboneConfig,
    DeiTToken,
    DistillationMethod,
    FitNets,
    LogitKD,
    ModelShape,
    NoDistillation,
    PromptedClassifier,
    ReviewKD,
)
from cdl_lightning.nn.kd import ABF
from cdl_lightning.nn.losses import dkd_loss
from cdl_lightning.nn.vit import prefix_block

NUM_CLASSES, START, STOP = 8, 4, 8  # two tasks of four classes; the student learns task 1
NUM_TOKENS = 17
TARGETS = torch.tensor([4, 7, 5, 6])


def backbone(width: int, depth: int, seed: int, patch: int = 8):
    torch.manual_seed(seed)
    kwargs = dict(img_size=32, patch_size=patch, embed_dim=width, depth=depth, num_heads=2)
    return BackboneConfig(name="vit_tiny_patch16_224", model_kwargs=kwargs).build()


def classifier(width: int, depth: int, seed: int, prompt_layers=(0,), patch: int = 8) -> PromptedClassifier:
    vit = backbone(width, depth, seed, patch)
    torch.manual_seed(seed + 100)
    prompt = L2P(width, width, 2, pool_size=6, length=4, top_k=2, layers=prompt_layers)
    model = PromptedClassifier(vit, NUM_CLASSES, prompt=prompt)
    with torch.no_grad():
        model.head.weight.mul_(20.0)  # sharper logits, so the distillation terms are far from trivial
    return model


def shape(model: PromptedClassifier) -> ModelShape:
    return ModelShape(model.backbone.embed_dim, model.backbone.depth, model.head.out_features)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def teacher() -> PromptedClassifier:
    return classifier(64, 4, seed=0).eval()


@pytest.fixture(scope="module")
def teacher_out(teacher, images):
    with torch.no_grad():
        return teacher(images, task=1, train=False, return_blocks=True)


@pytest.fixture
def student() -> PromptedClassifier:
    return classifier(32, 3, seed=1, prompt_layers=(0, 1)).train()


def student_forward(method: DistillationMethod, student: PromptedClassifier, images: torch.Tensor):
    inputs = method.student_inputs()
    return student(
        images, 1, True, prefixes=inputs.prefixes, prepend=inputs.prepend, append=inputs.append, return_blocks=True
    )


def hand_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    p_t = torch.softmax(teacher_logits / temperature, dim=1)
    log_p_s = torch.log_softmax(student_logits / temperature, dim=1)
    return temperature**2 * (p_t * (p_t.log() - log_p_s)).sum() / student_logits.shape[0]


def hand_ce(cls_logits: torch.Tensor) -> torch.Tensor:
    """CE over the current task's classes (past columns masked): the current columns with local targets."""
    return F.cross_entropy(cls_logits[:, START:STOP], TARGETS - START)


def capture_sequence(model: PromptedClassifier, fn):
    captured = []
    handle = model.backbone.vit.norm_pre.register_forward_pre_hook(lambda m, args: captured.append(args[0].detach()))
    try:
        result = fn()
    finally:
        handle.remove()
    return captured[-1], result  # the last pass: the prompted one (the query pass comes first)


# ---------------------------------------------------------------------------------------------------- base / none
def test_base_method_is_masked_cross_entropy(student, images):
    method = DistillationMethod()
    method.bind(shape(student), None)
    assert list(method.parameters()) == [] and not method.needs_teacher
    out = student_forward(method, student, images)
    torch.testing.assert_close(method.loss(out, None, TARGETS, START, STOP), hand_ce(out.logits), atol=1e-6, rtol=0)
    assert torch.equal(method.logits(out), out.logits)
    with pytest.raises(ValueError):
        DistillationMethod(alpha=1.5)
    with pytest.raises(ValueError):
        DistillationMethod(temperature=0.0)


def test_no_distillation_is_the_base_defaults_without_weights(student, images):
    method = NoDistillation()
    method.bind(shape(student), None)
    assert list(method.parameters()) == [] and not method.needs_teacher and method.alpha == 0.0
    assert method.spec() == {"class_path": "cdl_lightning.nn.kd.NoDistillation", "init_args": {}}
    out = student_forward(method, student, images)
    torch.testing.assert_close(method.loss(out, None, TARGETS, START, STOP), hand_ce(out.logits), atol=1e-6, rtol=0)
    assert torch.equal(method.logits(out), out.logits)


def test_parameters_created_by_bind_are_declared_in_the_constructor(student, teacher):
    declared = {FitNets: ["adapter"], ReviewKD: ["units"], DeiTToken: ["token", "kd_head"],
                KDP: ["token", "kd_head", "prefixes", "layers"]}
    for cls, names in declared.items():
        method = cls()
        assert all(getattr(method, name) is None for name in names), cls
        method.bind(shape(student), shape(teacher))
        assert all(getattr(method, name) is not None for name in names), cls


def test_model_shape_and_bind_create_parameters(student, teacher):
    s, t = shape(student), shape(teacher)
    assert (s.embed_dim, s.depth, s.num_classes) == (32, 3, NUM_CLASSES)
    assert (t.embed_dim, t.depth, t.num_classes) == (64, 4, NUM_CLASSES)
    fitnets = FitNets()
    assert fitnets.adapter is None
    fitnets.bind(s, t)
    assert (fitnets.adapter.in_features, fitnets.adapter.out_features) == (32, 64)
    kdp = KDP()
    kdp.bind(s, t)
    assert kdp.token.shape == (1, 1, 32) and kdp.prefixes.shape == (2, 6, 32)
    assert (kdp.kd_head.in_features, kdp.kd_head.out_features) == (32, NUM_CLASSES)
    for p in (kdp.token, kdp.prefixes):  # U(0, 1)
        assert p.min() >= 0 and p.max() <= 1 and abs(p.mean().item() - 0.5) < 1.2 / p.numel() ** 0.5  # U(0, 1): 4 sd
    deit = DeiTToken()
    deit.bind(s, t)
    assert deit.token.shape == (1, 1, 32) and torch.count_nonzero(deit.token) == 0
    assert (deit.kd_head.in_features, deit.kd_head.out_features) == (32, NUM_CLASSES)


# ---------------------------------------------------------------------------------------------------------- KDP
def test_kdp_inputs_token_last_and_prefixes_in_layers_1_to_depth(student, teacher, images):
    method = KDP()
    method.bind(shape(student), shape(teacher))
    inputs = method.student_inputs()
    assert inputs.append is method.token and inputs.prepend is None
    assert method.layers == [1, 2] and sorted(inputs.prefixes) == [1, 2]
    for i, layer in enumerate(method.layers):
        pk, pv = inputs.prefixes[layer]
        assert pk.shape == pv.shape == (1, 3, 32)
        assert torch.equal(pk[0], method.prefixes[i, :3]) and torch.equal(pv[0], method.prefixes[i, 3:])
    seq, out = capture_sequence(student, lambda: student_forward(method, student, images))
    assert seq.shape == (4, NUM_TOKENS + 1, 32)
    assert torch.equal(seq[:, -1], method.token[0, 0].expand(4, -1))  # appended raw (no positional embedding)
    assert out.tokens.shape == (4, NUM_TOKENS + 1, 32)
    assert torch.equal(out.features, out.tokens[:, 0])  # CLS stays at 0
    assert torch.equal(method.kd_logits(out), method.kd_head(out.tokens[:, -1]))


def test_kdp_prefixes_join_the_learner_prompts_in_each_block(student, teacher, images):
    method = KDP()
    method.bind(shape(student), shape(teacher))
    inputs = method.student_inputs()
    out = student_forward(method, student, images)
    learner = student.prompt(student.query(images), 1, True).prefixes  # L2P in layers 0 and 1
    blocks = student.backbone.vit.blocks
    # layer 0: only the learner's prompt; layer 1: learner rows then the 3 KD rows; layer 2: KD rows only
    seq, _ = capture_sequence(student, lambda: student_forward(method, student, images))
    x0 = prefix_block(blocks[0], seq, learner[0])
    torch.testing.assert_close(out.blocks[0], x0, atol=1e-6, rtol=0)
    kd_k, kd_v = inputs.prefixes[1]
    merged = (
        torch.cat([learner[1][0], kd_k.expand(4, -1, -1)], 1),
        torch.cat([learner[1][1], kd_v.expand(4, -1, -1)], 1),
    )
    assert merged[0].shape == (4, 2 * 2 + 3, 32)  # top-2 prompts x 2 key rows, then 3 KD key rows
    x1 = prefix_block(blocks[1], x0, merged)
    torch.testing.assert_close(out.blocks[1], x1, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.blocks[2], prefix_block(blocks[2], x1, inputs.prefixes[2]), atol=1e-5, rtol=0)


def test_kdp_prefixes_change_every_token(student, teacher, images):
    method = KDP()
    method.bind(shape(student), shape(teacher))
    before = student_forward(method, student, images)
    with torch.no_grad():
        method.prefixes[1].add_(torch.randn(6, 32))  # only the layer-2 KD prefix
    after = student_forward(method, student, images)
    assert torch.equal(after.blocks[0], before.blocks[0]) and torch.equal(after.blocks[1], before.blocks[1])
    change = (after.tokens - before.tokens).abs().amax(dim=-1)  # B x N
    assert (change > 1e-5).all(), "some token does not attend to the KD prefix"
    assert not torch.equal(after.logits, before.logits)


def test_kdp_loss_and_inference_by_hand(student, teacher, teacher_out, images):
    method = KDP(alpha=0.3, temperature=2.0)
    method.bind(shape(student), shape(teacher))
    out = student_forward(method, student, images)
    kd_logits = method.kd_head(out.tokens[:, -1])
    want = 0.7 * hand_ce(out.logits) + 0.3 * hand_kd(kd_logits[:, START:STOP], teacher_out.logits[:, START:STOP], 2.0)
    got = method.loss(out, teacher_out, TARGETS, START, STOP)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(method.logits(out), 0.7 * out.logits + 0.3 * kd_logits, atol=1e-6, rtol=0)
    # the KD term reaches the KD token, prefixes and KD head; CE reaches the learner's head
    got.backward()
    for p in (method.token, method.prefixes, method.kd_head.weight, student.head.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_kdp_validation(student, teacher):
    with pytest.raises(ValueError):
        KDP(prefix_length=5)
    with pytest.raises(ValueError):
        KDP(prefix_layers=[1, 3]).bind(shape(student), shape(teacher))  # student has 3 blocks


# ---------------------------------------------------------------------------------------------------- DeiT token
def test_deit_token_first_class_token_second_and_loss(student, teacher, teacher_out, images):
    method = DeiTToken(alpha=0.5, temperature=2.0)
    method.bind(shape(student), shape(teacher))
    inputs = method.student_inputs()
    assert inputs.prepend is method.token and inputs.append is None and inputs.prefixes == {}
    seq, out = capture_sequence(student, lambda: student_forward(method, student, images))
    assert torch.count_nonzero(seq[:, 0]) == 0  # zero-initialised, no positional embedding
    vit = student.backbone.vit
    assert torch.equal(seq[:, 1], (vit.cls_token + vit.pos_embed[:, :1])[0, 0].expand(4, -1))
    assert torch.equal(out.features, out.tokens[:, 1])
    assert torch.equal(out.logits, student.head(out.tokens[:, 1]))
    kd_logits = method.kd_head(out.tokens[:, 0])
    assert torch.equal(method.kd_logits(out), kd_logits)
    want = 0.5 * hand_ce(out.logits) + 0.5 * hand_kd(kd_logits[:, START:STOP], teacher_out.logits[:, START:STOP], 2.0)
    torch.testing.assert_close(method.loss(out, teacher_out, TARGETS, START, STOP), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(method.logits(out), 0.5 * out.logits + 0.5 * kd_logits, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------------ logit KD / DKD
def test_logit_kd_loss_by_hand(student, teacher, teacher_out, images):
    method = LogitKD(alpha=0.5, temperature=2.0)
    method.bind(shape(student), shape(teacher))
    assert method.needs_teacher and list(method.parameters()) == []
    out = student_forward(method, student, images)
    hand = hand_kd(out.logits[:, START:STOP], teacher_out.logits[:, START:STOP], 2.0)
    assert hand > 1e-2
    want = 0.5 * hand_ce(out.logits) + 0.5 * hand
    torch.testing.assert_close(method.loss(out, teacher_out, TARGETS, START, STOP), want, atol=1e-5, rtol=1e-5)
    assert torch.equal(method.logits(out), out.logits)


def test_dkd_method_uses_current_task_columns_and_local_targets(student, teacher, teacher_out, images):
    method = DKD(alpha=0.5)
    assert (method.tckd_weight, method.nckd_weight, method.temperature) == (1.0, 4.0, 4.0)
    method.bind(shape(student), shape(teacher))
    out = student_forward(method, student, images)
    s, t = out.logits[:, START:STOP], teacher_out.logits[:, START:STOP]
    dkd = dkd_loss(s, t, TARGETS - START, alpha=1.0, beta=4.0, temperature=4.0)
    # the DKD part by hand: TCKD + 4 NCKD at T = 4 with the target column removed for NCKD
    p_s, p_t = torch.softmax(s / 4, 1), torch.softmax(t / 4, 1)
    local = TARGETS - START
    hand = torch.zeros(())
    for b in range(4):
        y = local[b]
        bs, bt = torch.stack([p_s[b, y], 1 - p_s[b, y]]), torch.stack([p_t[b, y], 1 - p_t[b, y]])
        keep = torch.arange(4) != y
        qs, qt = torch.softmax(s[b, keep] / 4, 0), torch.softmax(t[b, keep] / 4, 0)
        hand = hand + (bt * (bt / bs).log()).sum() + 4 * (qt * (qt / qs).log()).sum()
    hand = 16 * hand / 4
    torch.testing.assert_close(dkd, hand, atol=1e-4, rtol=1e-4)
    want = 0.5 * hand_ce(out.logits) + 0.5 * hand
    torch.testing.assert_close(method.loss(out, teacher_out, TARGETS, START, STOP), want, atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------------------------------- FitNets
def test_fitnets_loss_by_hand(student, teacher, teacher_out, images):
    method = FitNets()
    assert method.feature_weight == 0.1 and method.needs_student_blocks and method.needs_teacher_blocks
    method.bind(shape(student), shape(teacher))
    out = student_forward(method, student, images)
    assert out.blocks[-1].shape == (4, NUM_TOKENS, 32) and teacher_out.blocks[-1].shape == (4, NUM_TOKENS, 64)
    projected = out.blocks[-1] @ method.adapter.weight.T + method.adapter.bias
    mse = ((projected - teacher_out.blocks[-1]) ** 2).mean()
    kd = 0.5 * hand_ce(out.logits) + 0.5 * hand_kd(out.logits[:, START:STOP], teacher_out.logits[:, START:STOP], 2.0)
    torch.testing.assert_close(
        method.loss(out, teacher_out, TARGETS, START, STOP), kd + 0.1 * mse, atol=1e-5, rtol=1e-5
    )


def test_fitnets_token_count_mismatch_raises(student, images):
    teacher16 = classifier(64, 4, seed=3, patch=16).eval()  # 32 px / 16 px patches: 5 tokens, not 17
    method = FitNets()
    method.bind(shape(student), shape(teacher16))
    with torch.no_grad():
        t_out = teacher16(images, 1, False, return_blocks=True)
    out = student_forward(method, student, images)
    with pytest.raises(ValueError, match="token counts"):
        method.loss(out, t_out, TARGETS, START, STOP)


# --------------------------------------------------------------------------------------------------- ReviewKD
def hand_review(method: ReviewKD, blocks: list[torch.Tensor]) -> list[torch.Tensor]:
    """Knowledge-review fusion by the formula: last block x' = LN(Lin(x)); earlier blocks fuse with the residual
    r from the block after: z0 = LN_f(Lin_f(x')), z1 = LN_f(Lin_f(r)), x'' = LN_o(x' z0 + r z1); out Lin(x'')."""
    outs: list[torch.Tensor] = [None] * len(blocks)  # type: ignore[list-item]
    residual = None
    for i in reversed(range(len(blocks))):
        unit = method.units[i]
        lin, ln = unit.inp
        x = F.layer_norm(blocks[i] @ lin.weight.T + lin.bias, (lin.out_features,), ln.weight, ln.bias, ln.eps)
        if residual is not None:
            f_lin, f_ln = unit.fuse

            def fuse(v, f_lin=f_lin, f_ln=f_ln):
                return F.layer_norm(v @ f_lin.weight.T + f_lin.bias, (f_lin.out_features,), f_ln.weight, f_ln.bias)

            x = unit.out_norm(x * fuse(x) + residual * fuse(residual))
        outs[i] = x @ unit.out.weight.T + unit.out.bias
        residual = x
    return outs


def test_reviewkd_units_and_loss_by_hand(student, teacher, teacher_out, images):
    method = ReviewKD()
    assert method.feature_weight == 0.2
    method.bind(shape(student), shape(teacher))
    assert len(method.units) == 3  # one unit per student block
    assert all(isinstance(u, ABF) for u in method.units)
    assert method.units[-1].fuse is None and all(u.fuse is not None for u in method.units[:-1])
    assert (method.units[0].out.in_features, method.units[0].out.out_features) == (32, 64)
    with torch.no_grad():  # make the fusion layers non-trivial
        for p in method.parameters():
            p.add_(0.1 * torch.randn_like(p))
    out = student_forward(method, student, images)
    fused = method.review(out.blocks)
    assert [f.shape for f in fused] == [(4, NUM_TOKENS, 64)] * 3
    for got, want in zip(fused, hand_review(method, out.blocks), strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # the 4-block teacher contributes its last 3 blocks: student block l <-> teacher block l + 1
    mse = torch.stack([((fused[i] - teacher_out.blocks[i + 1]) ** 2).mean() for i in range(3)]).mean()
    kd = 0.5 * hand_ce(out.logits) + 0.5 * hand_kd(out.logits[:, START:STOP], teacher_out.logits[:, START:STOP], 2.0)
    loss = method.loss(out, teacher_out, TARGETS, START, STOP)
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, kd + 0.2 * mse, atol=1e-5, rtol=1e-5)
    loss.backward()
    assert all(p.grad is not None for p in method.parameters())


def test_reviewkd_needs_a_teacher_at_least_as_deep(student):
    method = ReviewKD()
    with pytest.raises(ValueError, match="deep"):
        method.bind(shape(student), ModelShape(64, 2, NUM_CLASSES))


@pytest.mark.parametrize("method", [LogitKD(temperature=3.0), DKD(), KDP()], ids=["logit", "dkd", "kdp"])
def test_methods_deep_copy_and_pickle_with_their_spec(method):
    """``copy.deepcopy`` / pickle call ``__new__`` bare (`RecordsInitArgs`): the copy keeps the spec."""
    import copy
    import pickle

    for other in (copy.deepcopy(method), pickle.loads(pickle.dumps(method))):
        assert type(other) is type(method) and other.spec() == method.spec()
