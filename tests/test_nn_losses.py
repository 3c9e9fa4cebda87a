"""Distillation losses against hand computations (`cdl_lightning.nn.losses`)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cdl_lightning.nn.losses import dkd_loss, feature_mse, kd_loss, mask_past_classes


def logits(batch: int = 5, classes: int = 6, seed: int = 0) -> torch.Tensor:
    return 3.0 * torch.randn(batch, classes, generator=torch.Generator().manual_seed(seed))


def softmax_list(row: list[float], temperature: float) -> list[float]:
    exps = [math.exp(v / temperature) for v in row]
    total = sum(exps)
    return [e / total for e in exps]


def kl(p: list[float], q: list[float]) -> float:
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q, strict=True) if pi > 0)


def hand_kd(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> float:
    total = 0.0
    for s_row, t_row in zip(student.tolist(), teacher.tolist(), strict=True):
        total += kl(softmax_list(t_row, temperature), softmax_list(s_row, temperature))
    return temperature**2 * total / student.shape[0]


def hand_dkd_parts(student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor, temperature: float):
    """TCKD and NCKD of Zhao et al. (2022), computed sample by sample with the target column removed for NCKD."""
    tckd = nckd = 0.0
    for s_row, t_row, y in zip(student.tolist(), teacher.tolist(), targets.tolist(), strict=True):
        p_s, p_t = softmax_list(s_row, temperature), softmax_list(t_row, temperature)
        tckd += kl([p_t[y], 1 - p_t[y]], [p_s[y], 1 - p_s[y]])
        rest_s = softmax_list([v for j, v in enumerate(s_row) if j != y], temperature)
        rest_t = softmax_list([v for j, v in enumerate(t_row) if j != y], temperature)
        nckd += kl(rest_t, rest_s)
    batch = student.shape[0]
    return temperature**2 * tckd / batch, temperature**2 * nckd / batch


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_kd_loss_by_hand(temperature):
    s, t = logits(seed=1), logits(seed=2)
    got = kd_loss(s, t, temperature)
    assert got.shape == ()
    assert got.item() == pytest.approx(hand_kd(s, t, temperature), rel=1e-5, abs=1e-6)
    assert kd_loss(s, s, temperature).abs().item() < 1e-6


def test_kd_loss_default_temperature_is_2():
    s, t = logits(seed=1), logits(seed=2)
    assert kd_loss(s, t).item() == pytest.approx(hand_kd(s, t, 2.0), rel=1e-5)


def test_dkd_loss_parts_by_hand():
    s, t = logits(seed=3), logits(seed=4)
    y = torch.tensor([0, 5, 2, 2, 3])
    tckd, nckd = hand_dkd_parts(s, t, y, 4.0)
    assert dkd_loss(s, t, y, alpha=1.0, beta=0.0, temperature=4.0).item() == pytest.approx(tckd, rel=1e-4, abs=1e-6)
    assert dkd_loss(s, t, y, alpha=0.0, beta=1.0, temperature=4.0).item() == pytest.approx(nckd, rel=1e-4, abs=1e-6)
    # defaults: alpha 1, beta 4, T 4
    assert dkd_loss(s, t, y).item() == pytest.approx(tckd + 4 * nckd, rel=1e-4, abs=1e-6)
    tckd2, nckd2 = hand_dkd_parts(s, t, y, 2.0)
    got = dkd_loss(s, t, y, alpha=0.5, beta=2.0, temperature=2.0).item()
    assert got == pytest.approx(0.5 * tckd2 + 2.0 * nckd2, rel=1e-4, abs=1e-6)


def test_dkd_loss_is_zero_for_identical_logits():
    s = logits(seed=5)
    assert dkd_loss(s, s.clone(), torch.tensor([1, 1, 0, 4, 5])).abs().item() < 1e-5


def test_mask_past_classes():
    x = logits(batch=4, classes=10, seed=6)
    masked = mask_past_classes(x, 3, 6)
    assert masked.shape == (4, 6)
    assert torch.isneginf(masked[:, :3]).all()
    assert torch.equal(masked[:, 3:], x[:, 3:6])
    first = mask_past_classes(x, 0, 4)
    assert torch.equal(first, x[:, :4])
    # cross-entropy over the masked logits = cross-entropy over the current task's columns only
    y = torch.tensor([3, 5, 4, 4])
    torch.testing.assert_close(F.cross_entropy(masked, y), F.cross_entropy(x[:, 3:6], y - 3), atol=1e-6, rtol=0)


def test_mask_past_classes_keeps_gradient_for_current_columns():
    x = logits(batch=2, classes=8, seed=7).requires_grad_()
    F.cross_entropy(mask_past_classes(x, 2, 5), torch.tensor([2, 4])).backward()
    assert torch.count_nonzero(x.grad[:, :2]) == 0 and torch.count_nonzero(x.grad[:, 5:]) == 0
    assert torch.count_nonzero(x.grad[:, 2:5]) == 6


def test_feature_mse():
    a, b = torch.randn(2, 5, 4), torch.randn(2, 5, 4)
    assert feature_mse(a, b).item() == pytest.approx(((a - b) ** 2).mean().item(), rel=1e-6)
    with pytest.raises(ValueError, match="token counts"):
        feature_mse(torch.randn(2, 5, 4), torch.randn(2, 6, 4))
