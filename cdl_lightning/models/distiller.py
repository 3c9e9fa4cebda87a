"""`Distiller`: a student prompt learner taught, task by task, by a frozen teacher run's per-task snapshots."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Literal

import timm
import torch
from torch import Tensor, nn
from typing_extensions import override

from cdl_lightning.models.learner import PromptLearner, checkpoint_task_schedule
from cdl_lightning.models.snapshots import checkpoint_snapshots
from cdl_lightning.nn.classifier import ClassifierOutput, PromptedClassifier
from cdl_lightning.nn.kd import DistillationMethod, ModelShape, NoDistillation
from cdl_lightning.nn.prompts.base import build_prompt_pool
from cdl_lightning.nn.vit import BackboneConfig, PromptedViT, as_backbone_config
from cdl_lightning.tasks import TaskSchedule


def input_geometry(config: BackboneConfig) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(input size, patch grid)`` of a backbone, from a weight-less build of its timm ViT on the meta device."""
    kwargs = {"num_classes": 0, **(config.model_kwargs or {})}
    with torch.device("meta"):
        vit = timm.create_model(config.name, pretrained=False, **kwargs)
    return tuple(vit.patch_embed.img_size), tuple(vit.patch_embed.grid_size)


class TeacherRun:
    """What a distiller needs from a teacher `PromptLearner` checkpoint: its architecture and per-task snapshots.

    Args:
        path: a checkpoint written by a finished teacher run (``last.ckpt``), holding one snapshot per task.
    """

    def __init__(self, path: str) -> None:
        file = Path(path).expanduser()
        if not file.is_file():
            raise FileNotFoundError(f"teacher checkpoint {str(file)!r} does not exist: train the teacher first with "
                                    "`cdl fit --config <teacher config>` and point `teacher_checkpoint` at its "
                                    "checkpoints/last.ckpt")
        # safe loading: hyper-parameters hold plain values, config specs and `BackboneConfig` (a registered safe global)
        checkpoint = torch.load(file, map_location="cpu", weights_only=True)
        if "cdl" not in checkpoint:
            raise ValueError(f"{file} is not a cdl-lightning PromptLearner checkpoint")
        self.path = str(file)
        self.hparams: dict[str, Any] = dict(checkpoint["hyper_parameters"])
        cdl = checkpoint["cdl"]
        self.task_schedule: TaskSchedule = checkpoint_task_schedule(checkpoint)
        self.prompt_spec: dict[str, Any] | None = cdl["prompt_spec"]
        self.snapshots: list[dict[str, Tensor]] = checkpoint_snapshots(cdl)
        self.backbone: BackboneConfig = as_backbone_config(self.hparams["backbone"])
        self.query_backbone: BackboneConfig | None = as_backbone_config(self.hparams.get("query_backbone"))

    @property
    def query_identity(self) -> tuple:
        return (self.query_backbone or self.backbone).identity()

    def check_matches(
        self, student: TaskSchedule, backbone: BackboneConfig | None = None, same_tokens: bool = False
    ) -> None:
        """Refuse, before any compute, a teacher trained on another task split or class order than the ``student``'s
        schedule, one that did not finish (the epochs per task and class names may differ), or (given the student's
        ``backbone``) one that takes another input size than the student, or another patch grid when the method
        compares token features (``same_tokens``: FitNets, ReviewKD)."""
        if backbone is not None:
            (teacher_size, teacher_grid), (student_size, student_grid) = map(input_geometry, (self.backbone, backbone))
            if teacher_size != student_size or (same_tokens and teacher_grid != student_grid):
                what = "patch grid" if teacher_size == student_size else "input size"
                raise ValueError(
                    f"teacher {self.path} takes {teacher_size[0]}x{teacher_size[1]} images as a {teacher_grid[0]}x"
                    f"{teacher_grid[1]} patch grid ({self.backbone.name}, model_kwargs {self.backbone.model_kwargs}), "
                    f"the student {student_size[0]}x{student_size[1]} images as {student_grid[0]}x{student_grid[1]} "
                    f"patches ({backbone.name}): the {what} differs. Both see the same images, so give the student "
                    "backbone (and data.image_size) the teacher's img_size"
                    + (" and a patch size with the same grid (this method compares tokens)" if same_tokens else ""))
        teacher = self.task_schedule
        if teacher.task_sizes != student.task_sizes:
            raise ValueError(f"teacher {self.path} was trained on tasks of sizes {list(teacher.task_sizes)}, the "
                             f"student's data has {list(student.task_sizes)}: use the same data settings (num_tasks, "
                             "first_task_classes, source) for teacher and student")
        orders = teacher.class_order, student.class_order
        if None not in orders and orders[0] != orders[1]:
            raise ValueError(f"teacher {self.path} used another class order than the student's data (first labels "
                             f"{list(orders[0][:5])} vs {list(orders[1][:5])}): use the same class_order and seed for "
                             "both runs")
        if len(self.snapshots) < student.num_tasks:
            raise ValueError(f"teacher {self.path} has snapshots of {len(self.snapshots)} of {student.num_tasks} "
                             "tasks: let the teacher run finish (or resume it) before distilling")

    def build(self, query_encoder: PromptedViT | None) -> PromptedClassifier:
        """The frozen teacher network (eval mode, no grad); ``query_encoder`` is shared with the student if given."""
        backbone = self.backbone.build()
        if query_encoder is None and self.query_backbone is not None:
            query_encoder = self.query_backbone.build()
        prompt = build_prompt_pool(self.prompt_spec) if self.prompt_spec is not None else None
        teacher = PromptedClassifier(backbone, self.task_schedule.num_classes, prompt, query_encoder)
        teacher.requires_grad_(False)
        return teacher.eval()

    def snapshot(self, task: int) -> dict[str, Tensor]:
        """The teacher's classifier state after ``task`` (keys relative to the classifier)."""
        prefix = "classifier."
        return {k[len(prefix):]: v for k, v in self.snapshots[task].items() if k.startswith(prefix)}


class Distiller(PromptLearner):
    """Continual distillation (CDL, Zhang et al. 2024): for every task ``t`` the student learns ``t`` with knowledge
    distillation from the teacher's state after ``t``.

    The teacher comes from a finished teacher run's checkpoint; it switches to snapshot ``t`` when task ``t`` starts,
    runs in eval mode under ``no_grad`` (in the trainer's precision), is not registered as a submodule (so DDP does not
    wrap it and checkpoints do not hold it), and its weights never change. When teacher and student take the prompt
    query from the same frozen ViT, the query pass runs once and is shared.

    Args:
        method: the distillation method (`NoDistillation` = the student alone, `LogitKD`, `DKD`, `FitNets`,
            `ReviewKD`, `DeiTToken`, `KDP`, or your `DistillationMethod` subclass); ``None`` = `NoDistillation`.
        teacher_checkpoint: the teacher run's final checkpoint; required by every method but ``none``.
        teacher_prompt_mode: ``"eval"`` runs the teacher's prompt selection as at evaluation (key matching), ``"train"``
            as in training (true task id for DualPrompt).
        inference_only: build the student alone, for validate/test/predict/export (``cdl`` sets it for those): the
            teacher checkpoint is neither read nor needed, and parts that only the training loss uses and that are
            shaped by the teacher (FitNets/ReviewKD adapters) are not created (their checkpoint entries are skipped).
            The method's inference parts (KDP's KD prompts and head, the DeiT token and head) are built. Such a model
            cannot fit.
        concurrent_teacher: with ``cuda_graphs`` on CUDA, replay the teacher's pass on a second CUDA stream while the
            student's forward pass runs (`FastPaths.side_stream`; it starts after the query pass, which it may share);
            the loss waits for both. Only within this class's `training_step` (`FastPaths.overlap`): a
            `teacher_forward` called elsewhere runs at once. The same kernels run, so every number is unchanged
            (bitwise on an H200: ``benchmarks/check_fast_paths.py``, ``tests/gpu``). Measured on one H200 (bf16,
            batch 64; the second stream then had the default priority, now the high one): the ViT-B -> ViT-S KDP
            step 2,177 -> 2,265 img/s, a real 10-task run's training 1,701 -> 1,727 img/s. ``False`` runs the
            teacher first.
        teacher_low_precision: under a ``bf16-mixed`` trainer, run the frozen teacher entirely in bf16, outside
            autocast (`teacher_low_precision_`): its ViTs' LayerNorms, position embedding and residual stream, its
            prompts and head too, not only the matmul weights; its outputs are bf16 (the losses compute in fp32).
            Autocast keeps a ViT's residual stream in fp32, so every LayerNorm, residual add and matmul input cast of
            the teacher's passes (most of a KDP student's step: the ViT-B teacher runs two of them per batch) moves
            twice the bytes it does here. Opt-in and not bitwise: the residual stream is rounded to bf16 after every
            block (``benchmarks/check_fast_paths.py --teacher-low-precision`` measures the deviation of the teacher's
            logits and of the student's training from the default). Prompt selection by key matching (L2P,
            DualPrompt) may pick another prompt where two keys score within bf16 rounding. bf16 only: fp16 without
            autocast's fp32 LayerNorms risks overflow; under any other precision the teacher runs as without the
            flag (a warning says so). The student and its checkpoints are not touched.
        **kwargs: `PromptLearner` arguments for the student.
    """

    def __init__(
        self,
        method: DistillationMethod | None = None,
        teacher_checkpoint: str | None = None,
        teacher_prompt_mode: Literal["eval", "train"] = "eval",
        inference_only: bool = False,
        concurrent_teacher: bool = True,
        teacher_low_precision: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)  # its save_hyperparameters() also records this class's arguments
        self.fast_paths.side_stream = concurrent_teacher
        self.teacher_low_precision = teacher_low_precision
        self.teacher_dtype: torch.dtype | None = None  # the teacher runs entirely in it (`teacher_low_precision_`)
        method = method if method is not None else NoDistillation()
        self.teacher_prompt_mode = teacher_prompt_mode
        self.teacher_run: TeacherRun | None = None
        teacher: PromptedClassifier | None = None
        self.share_query = False
        self.inference_only = inference_only
        if method.needs_teacher and not inference_only:
            if teacher_checkpoint is None:
                raise ValueError(f"{type(method).__name__} distils from a teacher: set `teacher_checkpoint` to a "
                                 "finished teacher run's checkpoint")
            self.teacher_run = TeacherRun(teacher_checkpoint)
            same_tokens = method.needs_student_blocks and method.needs_teacher_blocks
            self.teacher_run.check_matches(self.task_schedule, self.backbone_config, same_tokens)
            student_query = self.query_config or self.backbone_config
            self.share_query = self.teacher_run.query_identity == student_query.identity()
            shared = self.classifier.query_encoder or self.classifier.backbone if self.share_query else None
            teacher = self.teacher_run.build(shared)
            teacher.load_state_dict(self.teacher_run.snapshot(0), strict=False)
        # the teacher is deliberately not a registered submodule: DDP must not wrap it, checkpoints must not hold it
        object.__setattr__(self, "teacher", teacher)
        student_vit = self.classifier.backbone
        teacher_shape = None
        if teacher is not None:
            teacher_shape = ModelShape(teacher.backbone.embed_dim, teacher.backbone.depth, self.num_classes)
        if teacher_shape is not None or not method.needs_teacher_blocks:  # else: training-only feature adapters
            method.bind(ModelShape(student_vit.embed_dim, student_vit.depth, self.num_classes), teacher_shape)
        self.method = method
        self.hparams["method"] = method.spec()  # named, not pickled (see PromptLearner's prompt)
        self.teacher_task = 0
        self.fast_paths.patch_embed_(self.frozen_vits())  # the teacher's ViTs too (`patch_embed_gemm`)

    @override
    def _apply(self, fn: Any, recurse: bool = True) -> Distiller:
        # device / dtype moves reach the unregistered teacher too
        super()._apply(fn, recurse)
        if getattr(self, "teacher", None) is not None:
            self.teacher._apply(fn, recurse)
        return self

    @override
    def train(self, mode: bool = True) -> Distiller:
        super().train(mode)
        if getattr(self, "teacher", None) is not None:
            self.teacher.eval()
        return self

    def teacher_low_precision_(self, dtype: torch.dtype | None) -> None:
        """Run the frozen teacher entirely in ``dtype`` (see ``teacher_low_precision``: its own ViTs through
        `PromptedViT.low_precision_`, prompt pool and head stored in ``dtype``; a query encoder shared with the student
        is left alone), or, with ``None``, store it in fp32 again (the current snapshot reloaded exactly; the ViTs'
        frozen weights stay as rounded). A trainer's ``setup`` calls it when ``teacher_low_precision`` is on; a Python
        loop calls it itself, before the first step (CUDA graphs capture the dtypes they see)."""
        if self.teacher is None or dtype == self.teacher_dtype:
            return
        shared = (self.classifier.query_encoder or self.classifier.backbone) if self.share_query else None
        for vit in self.teacher.frozen_modules():
            if vit is not shared:
                vit.low_precision_(dtype)
        for part in (self.teacher.prompt, self.teacher.head):
            if part is not None:
                part.to(dtype or torch.float32)
        self.teacher_dtype = dtype
        self.load_teacher_task(self.teacher_task)  # the snapshot's exact values, rounded once to the new dtype

    @override
    def cast_frozen_weights_(self, dtype: torch.dtype) -> None:
        low = self.teacher_dtype
        self.teacher_low_precision_(None)  # (a low-precision teacher's matmul weights are in `low`, whatever `dtype`)
        super().cast_frozen_weights_(dtype)
        self.teacher_low_precision_(low)

    def load_teacher_task(self, task: int) -> None:
        """Switch the teacher to its state after ``task``."""
        if self.teacher is None:
            return
        missing, unexpected = self.teacher.load_state_dict(self.teacher_run.snapshot(task), strict=False)
        trainable = {k for k, p in self.teacher.named_parameters() if k.startswith(("prompt.", "head."))}
        if unexpected or trainable & set(missing):
            raise RuntimeError(f"teacher snapshot {task} does not fit the teacher network (missing "
                               f"{sorted(trainable & set(missing))[:3]}, unexpected {unexpected[:3]})")
        self.teacher_task = task

    @override
    def open_task(self, task: int) -> None:
        super().open_task(task)
        self.load_teacher_task(task)

    @override
    def setup(self, stage: str) -> None:
        if stage == "fit" and self.inference_only:
            raise RuntimeError("this Distiller was built with inference_only=True (no teacher, no training-only parts) "
                               "and cannot fit: build it with inference_only=False and a teacher_checkpoint")
        precision = str(self.trainer.precision)
        low = torch.bfloat16 if self.teacher_low_precision and precision == "bf16-mixed" else None
        if low != self.teacher_dtype:  # (before the frozen weights are cast for this trainer)
            self.teacher_low_precision_(None)
        super().setup(stage)
        if self.teacher_low_precision and self.teacher is not None and low is None:
            warnings.warn(f"teacher_low_precision applies under precision 'bf16-mixed' only: under {precision!r} the "
                          "teacher runs as without it", stacklevel=2)
        self.teacher_low_precision_(low)

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.inference_only:  # skip the training-only method parts this model does not have (feature adapters)
            own = self.state_dict()
            state = checkpoint["state_dict"]
            for key in [k for k in state if k.startswith("method.") and k not in own]:
                del state[key]
        super().on_load_checkpoint(checkpoint)
        if self.opened_task >= 0:
            self.load_teacher_task(self.opened_task)

    @override
    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        # the teacher's pass may run beside the student's (`concurrent_teacher`) only here, where the learner's step
        # joins before its loss; leaving the scope (an error too) waits for anything still pending
        with self.fast_paths.overlap():
            return super().training_step(batch, batch_idx)

    @override
    def teacher_forward(self, images: Tensor, task: int, query: Tensor | None) -> ClassifierOutput | None:
        if self.teacher is None:
            return None
        inputs = (images, query) if self.share_query and query is not None else (images,)
        run = self.graphed("teacher", self._teacher_pass, [self.teacher])

        def teacher_pass() -> tuple[Tensor, ...]:
            with torch.no_grad():
                return run(*inputs, task=task, train=self.teacher_prompt_mode == "train",
                           blocks=self.method.needs_teacher_blocks)

        # on a second CUDA stream with `concurrent_teacher` in `training_step`: read only after `fast_paths.join()`
        return ClassifierOutput.from_tuple(self.fast_paths.aside(teacher_pass, inputs))

    def _teacher_pass(self, images: Tensor, *query: Tensor, task: int, train: bool, blocks: bool) -> tuple[Tensor, ...]:
        out = self.teacher(images, task, train=train, query=query[0] if query else None, return_blocks=blocks)
        return out.as_tuple()

    @override
    def frozen_vits(self) -> list[PromptedViT]:
        teacher = self.teacher.frozen_modules() if self.teacher is not None else []
        # a shared query encoder is the student's and the teacher's
        return list({id(v): v for v in super().frozen_vits() + teacher}.values())

    def teacher_parameters(self) -> list[nn.Parameter]:
        """The frozen teacher's parameters (for inspection and tests)."""
        return [] if self.teacher is None else list(self.teacher.parameters())
