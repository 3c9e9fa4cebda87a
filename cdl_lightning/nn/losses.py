"""Loss functions of continual distillation, each with its formula.

All take logits ``B x C`` restricted to the columns being distilled (in CDL: the current task's classes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def mask_past_classes(logits: Tensor, start: int, stop: int) -> Tensor:
    """Training logits of task ``t`` with classes ``[start, stop)``: cut to ``[0, stop)`` and set past columns
    ``[0, start)`` to ``-inf`` so cross-entropy competes only among the current task's classes (CODA-Prompt)."""
    logits = logits[:, :stop].float()
    if start == 0:
        return logits
    past = torch.full_like(logits[:, :start], float("-inf"))
    return torch.cat([past, logits[:, start:]], dim=1)


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 2.0) -> Tensor:
    """Logit distillation (Hinton et al., 2015):
    ``T^2 * KL(softmax(t / T) || softmax(s / T))`` averaged over the batch (``batchmean``)."""
    log_student = F.log_softmax(student_logits.float() / temperature, dim=1)
    teacher = F.softmax(teacher_logits.float() / temperature, dim=1)
    return F.kl_div(log_student, teacher, reduction="batchmean") * temperature**2


def dkd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor,
    alpha: float = 1.0,
    beta: float = 4.0,
    temperature: float = 4.0,
) -> Tensor:
    """Decoupled knowledge distillation (Zhao et al., CVPR 2022): ``alpha * TCKD + beta * NCKD``.

    TCKD is the KL between the binary distributions (target class, all others) of teacher and student; NCKD the KL
    between their distributions over the non-target classes (target logit masked out). Both are scaled by ``T^2``
    and summed over classes, averaged over the batch. ``targets`` index the given columns.
    """
    s, t = student_logits.float() / temperature, teacher_logits.float() / temperature
    gt = F.one_hot(targets, s.shape[1]).bool()
    p_s, p_t = F.softmax(s, dim=1), F.softmax(t, dim=1)
    bin_s = torch.stack([(p_s * gt).sum(1), (p_s * ~gt).sum(1)], dim=1)
    bin_t = torch.stack([(p_t * gt).sum(1), (p_t * ~gt).sum(1)], dim=1)
    tckd = F.kl_div(bin_s.clamp_min(1e-12).log(), bin_t, reduction="batchmean") * temperature**2
    log_s_nt = F.log_softmax(s - 1000.0 * gt, dim=1)
    p_t_nt = F.softmax(t - 1000.0 * gt, dim=1)
    nckd = F.kl_div(log_s_nt, p_t_nt, reduction="batchmean") * temperature**2
    return alpha * tckd + beta * nckd


def feature_mse(student_features: Tensor, teacher_features: Tensor) -> Tensor:
    """Mean squared error between (projected) student features and teacher features (FitNets, Romero et al. 2015)."""
    if student_features.shape != teacher_features.shape:
        raise ValueError(f"feature shapes differ: student {tuple(student_features.shape)} vs teacher "
                         f"{tuple(teacher_features.shape)} (token counts must match: same image and patch size)")
    return F.mse_loss(student_features.float(), teacher_features.float())
