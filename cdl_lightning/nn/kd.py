"""Distillation methods for a prompt-learner student and a frozen prompt-learner teacher (CDL, Zhang et al. 2024).

`DistillationMethod` is the base class: it names the hooks the learner calls (`bind`, `start_task`, `student_inputs`,
`logits`, `loss`) and their defaults. `NoDistillation` is the student alone; `LogitKD`, `DKD`, `FitNets`,
`ReviewKD`, `DeiTToken` and `KDP` distil from a teacher. Each method is a small ``nn.Module`` constructed with its
hyper-parameters only and declares there (as ``None``) the parameters that `DistillationMethod.bind` creates once the
widths, depths and class count of student and teacher are known (still before the optimizer exists, so all parameters
exist from the start of training). The soft targets are the teacher's logits over the current task's classes, as in
the CDL reference.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from typing_extensions import override

from cdl_lightning.nn.classifier import ClassifierOutput
from cdl_lightning.nn.losses import dkd_loss, feature_mse, kd_loss, mask_past_classes
from cdl_lightning.nn.spec import RecordsInitArgs
from cdl_lightning.nn.vit import Prefix


@dataclass
class StudentInputs:
    """Extra inputs a method adds to the student's forward pass."""

    prefixes: dict[int, Prefix] = field(default_factory=dict)
    prepend: Tensor | None = None
    append: Tensor | None = None


@dataclass
class ModelShape:
    """Width, depth and head size of one side (student or teacher)."""

    embed_dim: int
    depth: int
    num_classes: int


class DistillationMethod(RecordsInitArgs, nn.Module):
    """Base class of the distillation methods: the hooks a `Distiller` (and a plain `PromptLearner`) calls.

    A method overrides what it changes: `bind` (create its parameters, declared as ``None`` in its constructor),
    `start_task`, `student_inputs` (prefixes / extra tokens), `logits` (inference) and `loss`; it sets the class
    flags ``needs_teacher`` / ``needs_student_blocks`` / ``needs_teacher_blocks``. The defaults are cross-entropy on
    the student's class-token head with no teacher, so the base used as is trains the student alone, like
    `NoDistillation` (configs and checkpoints written before `NoDistillation` existed name it so).

    Args:
        alpha: weight of the distillation term; cross-entropy gets ``1 - alpha`` (reference 0.5).
        temperature: softmax temperature ``T`` of the soft targets (reference 2).
    """

    needs_teacher: ClassVar[bool] = False
    needs_student_blocks: ClassVar[bool] = False
    needs_teacher_blocks: ClassVar[bool] = False

    def __init__(self, alpha: float = 0.5, temperature: float = 2.0) -> None:
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.alpha = alpha
        self.temperature = temperature

    def bind(self, student: ModelShape, teacher: ModelShape | None) -> None:
        """Create the method's parameters for this student/teacher pair (default: none)."""

    def start_task(self, task: int) -> None:
        """Called when the student starts ``task`` (e.g. for a per-task temperature schedule); nothing by default."""

    def student_inputs(self) -> StudentInputs:
        """Prefixes and extra tokens for the student's forward pass."""
        return StudentInputs()

    def logits(self, student: ClassifierOutput) -> Tensor:
        """Student inference logits over all classes."""
        return student.logits

    def cross_entropy(self, student: ClassifierOutput, targets: Tensor, start: int, stop: int) -> Tensor:
        """Cross-entropy of the class-token head over the seen classes, past tasks' columns masked out."""
        return F.cross_entropy(mask_past_classes(student.logits, start, stop), targets)

    def loss(
        self, student: ClassifierOutput, teacher: ClassifierOutput | None, targets: Tensor, start: int, stop: int
    ) -> Tensor:
        """The student's loss (without the prompt loss) for a batch of task ``[start, stop)`` classes."""
        return self.cross_entropy(student, targets, start, stop)


class NoDistillation(DistillationMethod):
    """The student alone (the ``none`` baseline): cross-entropy on its class-token head, no teacher, no extra
    parameters."""

    def __init__(self) -> None:
        super().__init__(alpha=0.0)


class LogitKD(DistillationMethod):
    """Logit KD: ``(1 - alpha) CE + alpha T^2 KL_batchmean(softmax(t/T) || log_softmax(s/T))`` on the current-task
    logits of the student's class-token head (Hinton et al., 2015)."""

    needs_teacher = True

    def kd_term(self, student: ClassifierOutput, teacher: ClassifierOutput, start: int, stop: int) -> Tensor:
        """The distillation term (before ``alpha``)."""
        return kd_loss(student.logits[:, start:stop], teacher.logits[:, start:stop], self.temperature)

    @override
    def loss(
        self, student: ClassifierOutput, teacher: ClassifierOutput | None, targets: Tensor, start: int, stop: int
    ) -> Tensor:
        assert teacher is not None, "a teacher-distilling method got no teacher output"
        ce = self.cross_entropy(student, targets, start, stop)
        return (1 - self.alpha) * ce + self.alpha * self.kd_term(student, teacher, start, stop)


class DKD(DistillationMethod):
    """Decoupled KD (Zhao et al., CVPR 2022) on the current-task logits: ``(1 - alpha) CE + alpha DKD``, with
    ``DKD = tckd_weight * TCKD + nckd_weight * NCKD`` at temperature ``dkd_temperature`` (`dkd_loss`).

    Args:
        alpha: weight of the DKD term (reference 0.5).
        tckd_weight: DKD's alpha (reference 1).
        nckd_weight: DKD's beta (reference 4).
        dkd_temperature: DKD's temperature (reference 4); the method's ``temperature``.

    DKD once also took a ``temperature`` it never used; ``cdl validate --ckpt_path`` refuses checkpoints that still
    name it ("Option 'temperature' is not accepted"): delete it from the checkpoint's
    ``hyper_parameters["method"]["init_args"]``.
    """

    needs_teacher = True

    def __init__(
        self,
        alpha: float = 0.5,
        tckd_weight: float = 1.0,
        nckd_weight: float = 4.0,
        dkd_temperature: float = 4.0,
    ) -> None:
        super().__init__(alpha, temperature=dkd_temperature)
        self.tckd_weight, self.nckd_weight = tckd_weight, nckd_weight

    @override
    def loss(
        self, student: ClassifierOutput, teacher: ClassifierOutput | None, targets: Tensor, start: int, stop: int
    ) -> Tensor:
        assert teacher is not None, "a teacher-distilling method got no teacher output"
        ce = self.cross_entropy(student, targets, start, stop)
        dkd = dkd_loss(student.logits[:, start:stop], teacher.logits[:, start:stop], targets - start,
                       self.tckd_weight, self.nckd_weight, self.temperature)
        return (1 - self.alpha) * ce + self.alpha * dkd


class _FeatureKD(LogitKD):
    """Logit KD plus ``feature_weight`` times a feature term computed from the blocks of both models."""

    needs_student_blocks = True
    needs_teacher_blocks = True

    def __init__(self, alpha: float = 0.5, temperature: float = 2.0, feature_weight: float = 0.1) -> None:
        super().__init__(alpha, temperature)
        self.feature_weight = feature_weight

    def feature_loss(self, student: ClassifierOutput, teacher: ClassifierOutput) -> Tensor:
        """The feature term (before ``feature_weight``); every subclass defines it."""
        raise NotImplementedError(f"{type(self).__name__} must define feature_loss")

    @override
    def loss(
        self, student: ClassifierOutput, teacher: ClassifierOutput | None, targets: Tensor, start: int, stop: int
    ) -> Tensor:
        assert teacher is not None, "a teacher-distilling method got no teacher output"
        kd = super().loss(student, teacher, targets, start, stop)
        return kd + self.feature_weight * self.feature_loss(student, teacher)


class FitNets(_FeatureKD):
    """FitNets (Romero et al., ICLR 2015) on top of logit KD: ``KD + w * MSE(Linear_{Ds->Dt}(s_L), t_L)`` with
    ``s_L``/``t_L`` the last block's tokens (all of them, before the final norm).

    Args:
        alpha: KD weight (reference 0.5).
        temperature: KD temperature (reference 2).
        feature_weight: weight of the feature term (reference 0.1).
    """

    def __init__(self, alpha: float = 0.5, temperature: float = 2.0, feature_weight: float = 0.1) -> None:
        super().__init__(alpha, temperature, feature_weight)
        self.adapter: nn.Linear | None = None  # created by `bind`

    @override
    def bind(self, student: ModelShape, teacher: ModelShape | None) -> None:
        assert teacher is not None, "FitNets needs the teacher's shape"
        self.adapter = nn.Linear(student.embed_dim, teacher.embed_dim)

    @override
    def feature_loss(self, student: ClassifierOutput, teacher: ClassifierOutput) -> Tensor:
        return feature_mse(self.adapter(student.blocks[-1]), teacher.blocks[-1])


class ABF(nn.Module):
    """Attention-based fusion unit of Knowledge Review (Chen et al., CVPR 2021), adapted to tokens.

    ``x' = LN(Lin(x))``; with a residual ``r`` from the following block: ``z0 = LN_f(Lin_f(x'))``,
    ``z1 = LN_f(Lin_f(r))`` (one shared ``Lin_f``/``LN_f``; token x channel weight maps, no sigmoid) and
    ``x'' = LN_o(x' * z0 + r * z1)``; without residual ``x'' = x'``. Outputs ``Lin_{Ds->Dt}(x'')`` for the loss and
    ``x''`` as the next residual.
    """

    def __init__(self, student_dim: int, teacher_dim: int, fuse: bool) -> None:
        super().__init__()
        self.inp = nn.Sequential(nn.Linear(student_dim, student_dim), nn.LayerNorm(student_dim))
        self.fuse = nn.Sequential(nn.Linear(student_dim, student_dim), nn.LayerNorm(student_dim)) if fuse else None
        self.out_norm = nn.LayerNorm(student_dim) if fuse else None
        self.out = nn.Linear(student_dim, teacher_dim)

    def forward(self, x: Tensor, residual: Tensor | None) -> tuple[Tensor, Tensor]:
        x = self.inp(x)
        if self.fuse is not None and residual is not None:
            x = self.out_norm(x * self.fuse(x) + residual * self.fuse(residual))
        return self.out(x), x


class ReviewKD(_FeatureKD):
    """Knowledge Review (Chen et al., CVPR 2021) on top of logit KD: ``KD + w * mean_l MSE(f_l, t_l)``.

    The student's ``Ls`` block outputs are fused from the last to the first by ABF units; ``f_l`` is unit ``l``'s
    projection to the teacher width, ``t_l`` the output of the teacher's block ``l`` counted among its last ``Ls``
    blocks (so a deeper teacher contributes its last layers).

    Args:
        alpha: KD weight (reference 0.5).
        temperature: KD temperature (reference 2).
        feature_weight: weight of the review term (reference 0.2).
    """

    def __init__(self, alpha: float = 0.5, temperature: float = 2.0, feature_weight: float = 0.2) -> None:
        super().__init__(alpha, temperature, feature_weight)
        self.units: nn.ModuleList | None = None  # ABF units, created by `bind`

    @override
    def bind(self, student: ModelShape, teacher: ModelShape | None) -> None:
        assert teacher is not None, "ReviewKD needs the teacher's shape"
        if teacher.depth < student.depth:
            raise ValueError(f"ReviewKD needs a teacher at least as deep as the student ({teacher.depth} < "
                             f"{student.depth} blocks)")
        last = student.depth - 1
        self.units = nn.ModuleList(ABF(student.embed_dim, teacher.embed_dim, fuse=i != last)
                                   for i in range(student.depth))

    def review(self, student_blocks: list[Tensor]) -> list[Tensor]:
        """Projected fused features ``f_l`` for every student block ``l`` (in block order)."""
        outputs: list[Tensor] = [None] * len(student_blocks)  # type: ignore[list-item]
        residual = None
        for i in reversed(range(len(student_blocks))):
            outputs[i], residual = self.units[i](student_blocks[i], residual)
        return outputs

    @override
    def feature_loss(self, student: ClassifierOutput, teacher: ClassifierOutput) -> Tensor:
        fused = self.review(student.blocks)
        teacher_blocks = teacher.blocks[-len(fused):]
        return torch.stack([feature_mse(f, t) for f, t in zip(fused, teacher_blocks)]).mean()


class _ExtraTokenMethod(LogitKD):
    """Shared by the DeiT token and KDP: a KD head reads one extra token; ``(1 - alpha) CE(class-token head) +
    alpha T^2 KL(teacher || KD head)`` on the current task; inference mixes ``(1 - alpha) CLS + alpha KD``."""

    token_index: ClassVar[int] = 0

    def __init__(self, alpha: float = 0.5, temperature: float = 2.0) -> None:
        super().__init__(alpha, temperature)
        self.token: nn.Parameter | None = None  # the extra token, created by `bind`
        self.kd_head: nn.Linear | None = None  # created by `bind`

    def kd_logits(self, student: ClassifierOutput) -> Tensor:
        """The KD head's logits, read from the extra token's final feature."""
        return self.kd_head(student.tokens[:, self.token_index])

    @override
    def kd_term(self, student: ClassifierOutput, teacher: ClassifierOutput, start: int, stop: int) -> Tensor:
        return kd_loss(self.kd_logits(student)[:, start:stop], teacher.logits[:, start:stop], self.temperature)

    @override
    def logits(self, student: ClassifierOutput) -> Tensor:
        return (1 - self.alpha) * student.logits + self.alpha * self.kd_logits(student)


class DeiTToken(_ExtraTokenMethod):
    """DeiT's distillation token (Touvron et al., ICML 2021): one zero-initialised token concatenated at position 0,
    before the class token, after the positional embedding (so it has none), with its own KD head."""

    token_index = 0

    @override
    def bind(self, student: ModelShape, teacher: ModelShape | None) -> None:
        self.token = nn.Parameter(torch.zeros(1, 1, student.embed_dim))
        self.kd_head = nn.Linear(student.embed_dim, student.num_classes)

    @override
    def student_inputs(self) -> StudentInputs:
        return StudentInputs(prepend=self.token)


class KDP(_ExtraTokenMethod):
    """KD prompts, the CDL paper's method (Zhang et al., 2024): globally accessible prompts in the student, shared by
    all tasks (no pool, no selection), trained through the whole sequence.

    A KD token (``1 x D``, U(0, 1)) is appended at the end of the sequence at layer 0 after the positional embedding
    (it gets none); layers ``prefix_layers`` get a KD prefix of ``prefix_length`` rows (half keys, half values)
    alongside the learner's own prompts, which every token attends to; a separate KD head reads the KD token's final
    feature. Loss and inference as in `_ExtraTokenMethod`.

    Args:
        alpha: KD weight and inference mixing weight (reference 0.5).
        temperature: KD temperature (reference 2).
        prefix_length: KD prefix length per layer (reference 6: 3 key rows, 3 value rows).
        prefix_layers: blocks with a KD prefix; ``None`` = every block but the first (layers 1-11 of a ViT-B).
    """

    token_index = -1

    def __init__(
        self,
        alpha: float = 0.5,
        temperature: float = 2.0,
        prefix_length: int = 6,
        prefix_layers: list[int] | None = None,
    ) -> None:
        super().__init__(alpha, temperature)
        if prefix_length % 2:
            raise ValueError(f"KDP prefix_length must be even (half keys, half values), got {prefix_length}")
        self.prefix_length = prefix_length
        self.prefix_layers = prefix_layers
        self.layers: list[int] | None = None  # the blocks with a KD prefix, resolved by `bind`
        self.prefixes: nn.Parameter | None = None  # ``(len(layers), prefix_length, D)``, created by `bind`

    @override
    def bind(self, student: ModelShape, teacher: ModelShape | None) -> None:
        layers = list(range(1, student.depth)) if self.prefix_layers is None else list(self.prefix_layers)
        if any(not 0 <= layer < student.depth for layer in layers):
            raise ValueError(f"KDP prefix_layers {layers} out of range for a {student.depth}-block student")
        self.layers = layers
        self.token = nn.Parameter(torch.rand(1, 1, student.embed_dim))
        self.prefixes = nn.Parameter(torch.rand(len(layers), self.prefix_length, student.embed_dim))
        self.kd_head = nn.Linear(student.embed_dim, student.num_classes)

    @override
    def student_inputs(self) -> StudentInputs:
        half = self.prefix_length // 2
        prefixes = {layer: (self.prefixes[i, None, :half], self.prefixes[i, None, half:])
                    for i, layer in enumerate(self.layers)}
        return StudentInputs(prefixes=prefixes, append=self.token)


