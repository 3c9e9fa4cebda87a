"""Prompt learners against hand computations: CODA-Prompt, L2P, DualPrompt (`cdl_lightning.nn.prompts`)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cdl_lightning.nn.prompts import L2P, CodaPrompt, DualPrompt, build_prompt_pool, gram_schmidt_

D = 64  # prompted ViT width
DQ = 48  # query width (different from D, so the two widths are not confused)


def queries(batch: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, DQ, generator=torch.Generator().manual_seed(seed))


def scalar_of(prefixes: dict) -> torch.Tensor:
    """A scalar that depends on every prefix row (random weights so no gradient cancels)."""
    g = torch.Generator().manual_seed(123)
    total = torch.zeros(())
    for pk, pv in prefixes.values():
        total = (
            total + (pk * torch.randn(pk.shape, generator=g)).sum() + (pv * torch.randn(pv.shape, generator=g)).sum()
        )
    return total


def nonzero_rows(grad: torch.Tensor, dim: int) -> set[int]:
    """Indices along ``dim`` whose slice of ``grad`` has any non-zero entry."""
    moved = grad.movedim(dim, 0).reshape(grad.shape[dim], -1)
    return {i for i in range(moved.shape[0]) if moved[i].abs().sum() > 0}


# ====================================================================================================== CODA
def coda(**kwargs) -> CodaPrompt:
    args = dict(embed_dim=D, key_dim=DQ, num_tasks=4, pool_size=20, length=8, layers=(0, 1, 2), seed=0)
    args.update(kwargs)
    return CodaPrompt(**args)


def orthonormality_error(rows: torch.Tensor) -> float:
    flat = rows.reshape(rows.shape[0], -1).double()
    return (flat @ flat.T - torch.eye(flat.shape[0], dtype=torch.float64)).abs().max().item()


def test_coda_weights_are_cosine_of_attended_query_and_key():
    pool = coda()
    pool.start_task(1)
    with torch.no_grad():  # move away from the orthonormal draw, as training would
        for p in (pool.keys, pool.attention):
            p.add_(0.3 * torch.randn_like(p))
    q = queries()
    for layer_index in range(3):
        for train in (True, False):
            alpha = pool.weights(q, layer_index, task=1, train=train)
            assert alpha.shape == (4, 10)
            want = torch.zeros(4, 10)
            for k in range(10):
                a_k, key_k = pool.attention[layer_index, k], pool.keys[layer_index, k]
                want[:, k] = F.cosine_similarity(q * a_k, key_k.expand_as(q), dim=1)
            torch.testing.assert_close(alpha, want, atol=1e-5, rtol=0)


def test_coda_prompt_is_weighted_sum_of_components_split_in_halves():
    pool = coda()
    pool.start_task(1)
    with torch.no_grad():
        pool.components.add_(0.1 * torch.randn_like(pool.components))
    q = queries()
    out = pool(q, task=1, train=False)
    assert set(out.prefixes) == {0, 1, 2}
    assert out.loss.item() == 0.0
    for i, layer in enumerate(pool.layers):
        alpha = pool.weights(q, i, task=1, train=False)
        prompt = torch.zeros(4, 8, D)
        for k in range(10):
            prompt += alpha[:, k, None, None] * pool.components[i, k]
        pk, pv = out.prefixes[layer]
        assert pk.shape == pv.shape == (4, 4, D)
        torch.testing.assert_close(pk, prompt[:, :4], atol=1e-5, rtol=0)
        torch.testing.assert_close(pv, prompt[:, 4:], atol=1e-5, rtol=0)


def test_coda_eval_uses_components_up_to_the_task():
    pool = coda()
    for task in range(4):
        pool.start_task(task)
        assert pool.weights(queries(), 0, task=task, train=False).shape == (4, 5 * (task + 1))
        assert pool.weights(queries(), 0, task=task, train=True).shape == (4, 5 * (task + 1))
    # task 0 evaluated after the later draws still only uses [0, 5): the later components do not matter
    pool2 = coda()
    q = queries()
    before = pool2(q, task=0, train=False).prefixes
    pool2.start_task(1)
    pool2.start_task(2)
    after = pool2(q, task=0, train=False).prefixes
    for layer in before:
        assert torch.equal(before[layer][0], after[layer][0]) and torch.equal(before[layer][1], after[layer][1])


def test_gram_schmidt_new_slice_orthonormal_and_rest_untouched():
    g = torch.Generator().manual_seed(0)
    weight = torch.zeros(12, 3, 8)  # rows are flattened to 24-vectors
    gram_schmidt_(weight, 0, 4, g)
    assert orthonormality_error(weight[:4]) < 1e-5
    weight[8:] = torch.randn(4, 3, 8)  # sentinel rows after the slice
    before = weight.clone()
    gram_schmidt_(weight, 4, 8, g)
    assert torch.equal(weight[:4], before[:4])  # old rows bitwise untouched
    assert torch.equal(weight[8:], before[8:])  # rows after the slice untouched
    assert not torch.equal(weight[4:8], before[4:8])
    assert orthonormality_error(weight[4:8]) < 1e-5
    cross = weight[4:8].reshape(4, -1) @ weight[:4].reshape(4, -1).T
    assert cross.abs().max() < 1e-5  # orthogonal to the old components
    assert orthonormality_error(weight[:8]) < 1e-5


def test_gram_schmidt_is_seeded_and_checks_dimension():
    a, b = torch.zeros(6, 10), torch.zeros(6, 10)
    gram_schmidt_(a, 0, 3, torch.Generator().manual_seed(5))
    gram_schmidt_(b, 0, 3, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="orthogonalise"):
        gram_schmidt_(torch.zeros(12, 10), 0, 11)


def test_gram_schmidt_orthogonal_to_trained_old_components():
    # BUG (coda.py:31-38): the new rows are projected against the old rows one by one (classical Gram-Schmidt
    # with the *raw* old rows as the basis). That only orthogonalises when the old rows are already mutually
    # orthogonal, which they are not once task t-1 has trained them: the new slice is then neither orthogonal to
    # the earlier components nor orthonormal itself (max |<new, old>| ~ 0.2 here). SPEC section 3 asks for the
    # slice to be "Gram-Schmidt-orthogonalised against the earlier components"; orthonormalising against an
    # orthonormal basis of the old rows' span (e.g. QR of rows [0, start)) would satisfy it.
    g = torch.Generator().manual_seed(0)
    weight = torch.zeros(12, 24)
    gram_schmidt_(weight, 0, 4, g)
    weight[:4] += 0.3 * torch.randn(4, 24, generator=torch.Generator().manual_seed(1))  # "trained" old rows
    old = weight[:4].clone()
    gram_schmidt_(weight, 4, 8, g)
    assert torch.equal(weight[:4], old)
    cross = (weight[4:8].double() @ old.double().T).abs().max().item()
    assert cross < 1e-5, f"new components are not orthogonal to the earlier (trained) ones: max |dot| = {cross:.3g}"
    assert orthonormality_error(weight[4:8]) < 1e-5


def test_coda_construction_draws_orthonormal_task0_slice():
    pool = coda()
    for i in range(3):
        for weight in (pool.keys, pool.attention, pool.components):
            assert orthonormality_error(weight[i, :5]) < 1e-5
            assert torch.count_nonzero(weight[i, 5:]) == 0


def test_coda_start_task_redraws_only_its_slice():
    pool = coda()
    pool.start_task(0)  # task 0 was drawn at construction: no re-draw
    with torch.no_grad():  # simulate training of task 0
        for p in (pool.keys, pool.attention, pool.components):
            p[:, :5] += 0.1 * torch.randn_like(p[:, :5])
    before = {n: p.detach().clone() for n, p in pool.named_parameters()}
    pool.start_task(0)
    for n, p in pool.named_parameters():
        assert torch.equal(p, before[n])
    pool.start_task(1)
    assert pool.task == 1
    for n, p in pool.named_parameters():
        assert torch.equal(p[:, :5], before[n][:, :5]), n  # earlier components untouched
        assert torch.equal(p[:, 10:], before[n][:, 10:]), n  # later components still zero
        assert torch.count_nonzero(p[:, 10:]) == 0
        norms = p[:, 5:10].reshape(3, 5, -1).norm(dim=-1)
        torch.testing.assert_close(norms, torch.ones(3, 5), atol=1e-5, rtol=0)  # unit-norm fresh draws
    # without training in between, the new slice is orthonormal and orthogonal to the earlier one
    fresh = coda()
    fresh.start_task(1)
    for weight in (fresh.keys, fresh.attention, fresh.components):
        for i in range(3):
            assert orthonormality_error(weight[i, :10]) < 1e-5


def test_coda_training_gradient_only_reaches_current_slice():
    pool = coda()
    for t in (1, 2):
        pool.start_task(t)
    out = pool(queries(), task=2, train=True)
    scalar_of(out.prefixes).backward()
    for p in (pool.keys, pool.attention, pool.components):
        assert p.grad is not None
        assert torch.count_nonzero(p.grad[:, :10]) == 0  # earlier tasks' components: exactly zero
        assert torch.count_nonzero(p.grad[:, 15:]) == 0  # later components: unused
        for i in range(3):
            assert nonzero_rows(p.grad[i], 0) == set(range(10, 15))


def test_coda_train_and_eval_prompts_agree_in_value():
    pool = coda()
    pool.start_task(1)
    q = queries()
    train, evaluation = pool(q, task=1, train=True), pool(q, task=1, train=False)
    for layer in pool.layers:
        torch.testing.assert_close(train.prefixes[layer][0], evaluation.prefixes[layer][0], atol=1e-6, rtol=0)


def test_coda_orthogonality_penalty():
    pool = coda(ortho_weight=0.5)
    pool.start_task(1)
    with torch.no_grad():
        for p in (pool.keys, pool.attention, pool.components):
            p[:, :10] += 0.1 * torch.randn_like(p[:, :10])
    loss = pool(queries(), task=1, train=True).loss
    want = torch.zeros(())
    for i in range(3):
        for p in (pool.keys, pool.attention, pool.components):
            flat = p[i, :10].reshape(10, -1)
            want = want + 0.5 * ((flat @ flat.T - torch.eye(10)) ** 2).mean()  # the reference averages
    torch.testing.assert_close(loss, want, atol=1e-5, rtol=1e-5)
    assert pool(queries(), task=1, train=False).loss.item() == 0.0


def test_coda_orthogonality_penalty_leaves_past_components_frozen():
    # task 1 trained with Adam (state cleared at the task start, as the learner does) and a strong penalty: the
    # rows of task 0 (keys, attention, components) get exactly zero gradient and stay bitwise unchanged
    pool = coda(ortho_weight=1.0)
    pool.start_task(1)
    with torch.no_grad():  # past components that drifted from orthogonality, so the penalty would pull on them
        for p in (pool.keys, pool.attention, pool.components):
            p[:, :5] += 0.2 * torch.randn_like(p[:, :5])
    before = {name: p.detach().clone() for name, p in pool.named_parameters()}
    optimizer = torch.optim.Adam(pool.parameters(), lr=1e-2)
    for step in range(5):
        optimizer.zero_grad()
        out = pool(queries(seed=step), task=1, train=True)
        assert out.loss.item() > 0
        out.loss.backward()
        for p in (pool.keys, pool.attention, pool.components):
            assert p.grad[:, :5].abs().max().item() == 0.0
            assert p.grad[:, 5:10].abs().max().item() > 0
        optimizer.step()
    for name, p in pool.named_parameters():
        assert torch.equal(p[:, :5], before[name][:, :5]), name
        assert not torch.equal(p[:, 5:10], before[name][:, 5:10]), name


def test_coda_rejects_impossible_pools():
    with pytest.raises(ValueError):
        coda(pool_size=DQ + 2, num_tasks=2)
    with pytest.raises(ValueError):
        coda(length=7)
    with pytest.raises(ValueError):
        coda(components_per_task=6)  # 6 * 4 > 20


def test_coda_spec_rebuilds_identical_pool():
    pool = coda(seed=3)
    rebuilt = build_prompt_pool(pool.spec())
    assert type(rebuilt) is CodaPrompt
    for (n, p), (m, r) in zip(pool.named_parameters(), rebuilt.named_parameters(), strict=True):
        assert n == m and torch.equal(p, r)


@pytest.mark.parametrize("make", ["coda", "l2p", "dual"])
def test_pools_deep_copy_and_pickle_with_their_spec(make):
    """``copy.deepcopy`` and pickle (``ddp_spawn``, Lightning's weight-averaging callbacks) call ``__new__`` without
    the constructor's arguments; the copy keeps the spec and the parameters."""
    import copy
    import pickle

    pool = {"coda": lambda: coda(seed=3), "l2p": lambda: l2p(), "dual": lambda: dual()}[make]()
    for other in (copy.deepcopy(pool), pickle.loads(pickle.dumps(pool))):
        assert type(other) is type(pool) and other.spec() == pool.spec()
        for (n, p), (m, r) in zip(pool.named_parameters(), other.named_parameters(), strict=True):
            assert n == m and torch.equal(p, r)


# ======================================================================================================= L2P
def l2p(**kwargs) -> L2P:
    torch.manual_seed(0)
    args = dict(embed_dim=D, key_dim=DQ, num_tasks=4, pool_size=30, length=20, top_k=5, layers=(0,), init="normal")
    args.update(kwargs)
    return L2P(**args)


def test_l2p_selects_top_k_by_cosine_and_concatenates_halves():
    pool = l2p()
    q = queries()
    out = pool(q, task=0, train=True)
    cos = torch.stack([F.cosine_similarity(q, pool.keys[0, i].expand_as(q), dim=1) for i in range(30)], dim=1)
    for b in range(4):
        want = sorted(range(30), key=lambda i: -cos[b, i].item())[:5]
        assert out.selected[b].tolist() == want
    pk, pv = out.prefixes[0]
    assert pk.shape == pv.shape == (4, 50, D)  # 5 prompts x 10 key rows, 5 x 10 value rows
    for b in range(4):
        chosen = out.selected[b].tolist()
        assert torch.equal(pk[b], torch.cat([pool.prompts[0, j, :10] for j in chosen]))
        assert torch.equal(pv[b], torch.cat([pool.prompts[0, j, 10:] for j in chosen]))
    # auxiliary loss: mean_b sum_{selected} (1 - cos)
    want_loss = torch.stack([sum(1 - cos[b, j] for j in out.selected[b].tolist()) for b in range(4)]).mean()
    torch.testing.assert_close(out.loss, want_loss, atol=1e-5, rtol=0)


def test_l2p_uniform_init_reference():
    torch.manual_seed(0)
    pool = L2P(D, DQ, 4)
    assert pool.keys.shape == (1, 30, DQ) and pool.prompts.shape == (1, 30, 20, D)
    assert pool.layers == (0,)
    for p in (pool.keys, pool.prompts):
        assert p.min() >= 0 and p.max() <= 1 and abs(p.mean().item() - 0.5) < 1.2 / p.numel() ** 0.5  # U(0, 1): 4 sd


def test_l2p_gradient_only_for_selected_prompts_and_keys():
    pool = l2p()
    out = pool(queries(batch=2), task=0, train=True)
    (out.loss + scalar_of(out.prefixes)).backward()
    chosen = set(out.selected.flatten().tolist())
    assert len(chosen) < 30
    assert nonzero_rows(pool.keys.grad[0], 0) == chosen
    assert nonzero_rows(pool.prompts.grad[0], 0) == chosen


def test_l2p_several_layers_sum_losses():
    pool = l2p(layers=(0, 2))
    q = queries()
    out = pool(q, task=0, train=False)
    assert set(out.prefixes) == {0, 2}
    want = torch.zeros(())
    for i in range(2):
        cos = F.normalize(q, dim=-1) @ F.normalize(pool.keys[i], dim=-1).T
        want = want + (1 - cos.topk(5, dim=1).values).sum(1).mean()
    torch.testing.assert_close(out.loss, want, atol=1e-5, rtol=0)


# ================================================================================================= DualPrompt
def dual(**kwargs) -> DualPrompt:
    torch.manual_seed(0)
    args = dict(
        embed_dim=D, key_dim=DQ, num_tasks=4, g_length=6, g_layers=(0, 1), pool_size=5, e_length=20, e_layers=(2, 3)
    )
    args.update(kwargs)
    return DualPrompt(**args)


def test_dualprompt_training_uses_true_task_whatever_the_query():
    pool = dual()
    assert pool.layers == (0, 1, 2, 3)
    for seed in (0, 1):
        out = pool(queries(seed=seed), task=2, train=True)
        assert set(out.prefixes) == {0, 1, 2, 3}
        for i, layer in enumerate((0, 1)):  # G-prompts: 3 key rows, 3 value rows
            pk, pv = out.prefixes[layer]
            assert pk.shape == (4, 3, D)
            assert torch.equal(pk, pool.g_prompts[i, :3].expand(4, -1, -1))
            assert torch.equal(pv, pool.g_prompts[i, 3:].expand(4, -1, -1))
        for i, layer in enumerate((2, 3)):  # E-prompt of the true task: 10 key rows, 10 value rows
            pk, pv = out.prefixes[layer]
            assert pk.shape == (4, 10, D)
            assert torch.equal(pk, pool.e_prompts[i, 2, :10].expand(4, -1, -1))
            assert torch.equal(pv, pool.e_prompts[i, 2, 10:].expand(4, -1, -1))
        assert out.selected.flatten().tolist() == [2] * 4


def test_dualprompt_training_loss():
    pool = dual()
    q = queries()
    out = pool(q, task=1, train=True)
    want = sum((1 - F.cosine_similarity(q, pool.e_keys[i, 1].expand_as(q), dim=1)).mean() for i in range(2))
    torch.testing.assert_close(out.loss, want, atol=1e-5, rtol=0)


def test_dualprompt_eval_picks_best_key_per_layer():
    pool = dual(init="normal")
    # queries that match key b in layer 2 exactly (cos 1): layer 3 picks whatever its own keys say
    with torch.no_grad():
        pool.e_keys[0, :4] = torch.randn(4, DQ)
    q = pool.e_keys[0, :4].detach().clone() * 3.0
    out = pool(q, task=0, train=False)
    for i, layer in enumerate((2, 3)):
        cos = torch.stack([F.cosine_similarity(q, pool.e_keys[i, j].expand_as(q), dim=1) for j in range(5)], dim=1)
        best = cos.argmax(dim=1)
        if i == 0:
            assert best.tolist() == [0, 1, 2, 3]
        pk, pv = out.prefixes[layer]
        for b in range(4):
            assert torch.equal(pk[b], pool.e_prompts[i, best[b], :10])
            assert torch.equal(pv[b], pool.e_prompts[i, best[b], 10:])


def test_dualprompt_training_gradient_only_for_task_entry_and_g_prompts():
    pool = dual()
    out = pool(queries(), task=3, train=True)
    (out.loss + scalar_of(out.prefixes)).backward()
    assert nonzero_rows(pool.g_prompts.grad, 0) == {0, 1}
    for i in range(2):
        assert nonzero_rows(pool.e_prompts.grad[i], 0) == {3}
        assert nonzero_rows(pool.e_keys.grad[i], 0) == {3}


def test_dualprompt_shared_g_and_e_layer_concatenates():
    pool = dual(g_layers=(0, 1), e_layers=(1, 2))
    pk, pv = pool(queries(), task=1, train=True).prefixes[1]
    assert torch.equal(pk[0], torch.cat([pool.g_prompts[1, :3], pool.e_prompts[0, 1, :10]]))
    assert torch.equal(pv[0], torch.cat([pool.g_prompts[1, 3:], pool.e_prompts[0, 1, 10:]]))


def test_dualprompt_reference_defaults_uniform_init():
    torch.manual_seed(0)
    pool = DualPrompt(D, DQ, 10)
    assert pool.g_layers == (0, 1) and pool.e_layers == (2, 3, 4) and pool.layers == (0, 1, 2, 3, 4)
    assert pool.g_prompts.shape == (2, 6, D)
    assert pool.e_keys.shape == (3, 10, DQ) and pool.e_prompts.shape == (3, 10, 20, D)
    for p in (pool.g_prompts, pool.e_keys, pool.e_prompts):
        assert p.min() >= 0 and p.max() <= 1 and abs(p.mean().item() - 0.5) < 1.2 / p.numel() ** 0.5  # U(0, 1): 4 sd


def test_dualprompt_validation():
    with pytest.raises(ValueError):
        dual(num_tasks=6)  # pool of 5
    with pytest.raises(ValueError):
        dual(e_length=7)
    with pytest.raises(ValueError):
        dual(g_layers=(0, 0))
