"""`PromptLearner`: one prompt learner trained over the whole task sequence inside one ``trainer.fit``."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import Tensor
from typing_extensions import override

from cdl_lightning.models import optimizer_state
from cdl_lightning.models.fast_paths import FastPaths
from cdl_lightning.models.snapshots import PACKED_KEY, SnapshotPacker, checkpoint_snapshots
from cdl_lightning.nn.classifier import ClassifierOutput, PromptedClassifier
from cdl_lightning.nn.graphs import GraphedFunction, GraphedTrainingPass
from cdl_lightning.nn.kd import DistillationMethod, NoDistillation
from cdl_lightning.nn.prompts.base import PromptPool
from cdl_lightning.nn.vit import BackboneConfig, PromptedViT, as_backbone_config
from cdl_lightning.tasks import TaskSchedule

PromptFactory = Callable[[int, int, int], PromptPool]
"""Builds a prompt pool from ``(embed_dim, key_dim, num_tasks)``; in YAML a ``class_path`` with ``init_args``."""


def quarter_cosine(epoch_in_task: int, epochs_per_task: int, off_by_one: bool = False) -> float:
    """The CODA-Prompt reference schedule factor ``cos(99 pi i / (200 (K - 1)))`` (a quarter cosine from 1 down to
    ~0.016, not ``(1 + cos) / 2``), with ``i`` the epoch within the task; ``off_by_one`` reproduces the reference,
    whose epochs 0 and 1 both use ``i = 0`` (epoch ``e >= 1`` uses ``i = e - 1``)."""
    if epochs_per_task <= 1:
        return 1.0
    i = max(epoch_in_task - 1, 0) if off_by_one else epoch_in_task
    return math.cos(99 * math.pi * i / (200 * (epochs_per_task - 1)))


def as_task_schedule(
    task_schedule: TaskSchedule | Mapping[str, Any] | None,
    task_sizes: list[int] | None = None,
    epochs_per_task: int | None = None,
    class_names: list[str] | None = None,
    class_order: list[int] | None = None,
) -> TaskSchedule:
    """The learner's `TaskSchedule`, from the schedule itself (or its `TaskSchedule.to_dict` form) and/or the separate
    facts that learners took before the schedule existed (Python callers, hyper-parameters of older checkpoints).

    Raises:
        ValueError: no task sizes at all, or separate facts that contradict the schedule.
    """
    if task_schedule is None:
        if not task_sizes:
            raise ValueError("task_schedule is required (classes per task, epochs per task, class order and names): "
                             "`cdl` links it from the data module; from Python pass `task_schedule=datamodule."
                             "task_schedule` (or `**datamodule.model_kwargs()`)")
        return TaskSchedule(tuple(task_sizes), epochs_per_task or 1, class_order, class_names or None)
    schedule = TaskSchedule.from_dict(task_schedule)
    given = {"task_sizes": task_sizes, "epochs_per_task": epochs_per_task, "class_order": class_order,
             "class_names": class_names}
    facts = schedule.to_dict()
    clashes = [name for name, value in given.items()
               if value is not None and facts[name] is not None and _plain(value) != facts[name]]
    if clashes:
        raise ValueError(f"{', '.join(clashes)} given next to a task_schedule that says otherwise "
                         f"({', '.join(f'{n}={_plain(given[n])!r:.60} vs {facts[n]!r:.60}' for n in clashes)}): "
                         "the data differ from those the model (or checkpoint) was made for; pass the schedule alone")
    return schedule


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value


_OLD_TASK_FACTS = ("task_sizes", "epochs_per_task", "class_names", "class_order")
"""The learner arguments that `TaskSchedule` replaced (still accepted)."""


def checkpoint_task_schedule(checkpoint: Mapping[str, Any]) -> TaskSchedule:
    """The task schedule a learner checkpoint was written with: its ``cdl["task_schedule"]``, or for checkpoints
    written before the schedule existed, their separate ``task_sizes`` / ``class_order`` / ``class_names`` (and the
    hyper-parameters' ``epochs_per_task``)."""
    cdl = checkpoint["cdl"]
    if "task_schedule" in cdl:
        return TaskSchedule.from_dict(cdl["task_schedule"])
    epochs = checkpoint.get("hyper_parameters", {}).get("epochs_per_task") or 1
    return TaskSchedule(tuple(cdl["task_sizes"]), epochs, cdl.get("class_order"), cdl.get("class_names") or None)


class PromptLearner(LightningModule):
    """A prompt learner (L2P, DualPrompt, CODA-Prompt, or a linear probe) on a frozen timm ViT, over a task sequence.

    One fit covers all tasks: the current task is ``current_epoch // epochs_per_task``. When a task starts, the
    prompt pool opens it (CODA re-draws its slice), Adam's state is cleared and the per-task LR schedule restarts;
    training logits are cut to the seen classes with past-task columns at ``-inf``; evaluation uses all seen classes.
    At each task end the trainable state is snapshotted (a distiller's teacher reads these snapshots). Checkpoints
    hold the trainable state, the snapshots (each as the rows its task changed: `cdl_lightning.models.snapshots`),
    Adam's state as its nonzero rows (`cdl_lightning.models.optimizer_state`) and the backbone's identity, never the
    frozen weights.

    Args:
        backbone: identity of the frozen ViT (timm name, pretrained or local weights file, normalisation).
        prompt: prompt pool factory (``class_path`` + ``init_args`` in YAML); ``None`` = linear probe baseline.
        query_backbone: a separate frozen ViT for the prompt query; ``None`` = ``backbone`` itself. The CDL reference
            takes the query from a ViT of the student's architecture in both teacher and student.
        task_schedule: the task sequence (`TaskSchedule`: classes per task, epochs per task, class order and names),
            linked from the data module by the CLI; from Python ``task_schedule=datamodule.task_schedule``. Kept in
            checkpoints (class names for ``cdl predict``; the class order a distiller checks its teacher against).
        task_sizes: older form of ``task_schedule`` (with ``epochs_per_task``, ``class_names``, ``class_order``):
            still accepted, turned into a schedule; they must agree with ``task_schedule`` when both are given.
        epochs_per_task: see ``task_sizes``.
        class_names: see ``task_sizes``.
        class_order: see ``task_sizes``.
        lr: Adam learning rate (reference 1e-3).
        betas: Adam betas (reference 0.9, 0.999).
        weight_decay: Adam weight decay (reference 0).
        schedule: ``"cosine"`` = the reference's quarter cosine per task, or ``"constant"``.
        reference_lr_off_by_one: reproduce the reference's schedule off-by-one (epochs 0 and 1 share the first LR).
        compile: ``torch.compile`` every frozen ViT pass (prompted forward and query, teacher's too) when the trainer
            sets up (`FastPaths`). With ``cuda_graphs`` the compiled gradient-free passes are captured into the CUDA
            graphs (the graphed training pass stays uncompiled); without, every pass runs compiled, ungraphed. Not
            bitwise equal to eager (inductor fuses kernels; ``benchmarks/check_fast_paths.py --compile`` measures the
            deviation), so off by default. Costs a minute or more of compilation. Static shapes, a smaller batch
            (an epoch's or an evaluation's last) padded to a compiled batch size (`FastPaths.compile_`). Measured on an
            H100 before that padding existed, ``cdl fit`` ran slower compiled than eager; with it (and
            ``patch_embed_gemm``, 10 tasks x 3 epochs, another H100) the teacher trained at 2,105 img/s against 2,039
            and the student at 1,706 against 1,843: faster within an epoch (steady 1,986 vs 1,914), slower in each
            epoch's first batches (README, Speed; ``benchmarks/measured/2026-12-08_h100``).
        cast_frozen_weights: under a ``bf16-mixed`` / ``16-mixed`` trainer, store the frozen ViTs' Linear and Conv
            weights in that dtype when the trainer sets up (`PromptedViT.cast_matmul_weights_`): autocast would
            re-cast them on every pass; results are bit-identical. Checkpoints never hold these weights.
        cuda_graphs: on CUDA, replay the frozen ViT passes from CUDA graphs: the gradient-free ones (the training
            step's prompt-query pass, a distiller's teacher, evaluation and prediction) via `GraphedFunction`, the
            prompted training pass forward and backward via `GraphedTrainingPass`. One launch instead of hundreds per
            pass; eager steps are bound by kernel-launch overhead. Same kernels, same results.
        graph_prompts: with ``cuda_graphs``, also replay the prompt pool's training pass (the prompt assembly from
            the query, forward and backward) from CUDA graphs (`GraphedPromptPass`, one capture per task): eagerly,
            a ViT-B -> ViT-S KDP student step on one H200 spent ~6 ms of host time assembling CODA prompts and most
            of its 13 ms of backward host time in their autograd nodes. Bitwise equal to eager under bf16 on an H200
            (``benchmarks/check_fast_paths.py``, ``tests/gpu``); measured there: the B->S step 2,152 -> 2,177 img/s,
            a real 10-task run's training 1,788 -> 1,827 img/s (1,701 vs 1,665 on another H200). Off by default:
            its graphs are captured per task and the older ones dropped, and `torch.cuda.make_graphed_callables`
            captures them on a stream it picks, possibly the training pass graph's; in recent torch (2.14.1 checked)
            destroying a graph frees the cuBLAS workspace of its capture stream (pytorch/pytorch#193402), which the
            live training-pass graph may still use. Not observed in 10-task runs, not excluded either.
        patch_embed_gemm: run every frozen ViT's patch embedding (the teacher's and query ViT's too; timm's
            ``PatchEmbed``, a Conv2d with kernel == stride == patch size) as a reshape and one GEMM
            (`cdl_lightning.nn.vit.GemmPatchEmbed`), in the prompted and the query pass: in a profiled bf16 ViT-B ->
            ViT-S step at batch 64, 224 px on an H200, cuDNN's kernels for this convolution took 395-519 us per call
            (four calls a step), for what is a ~15 GFLOP GEMM.
            Not bitwise: the GEMM sums the products in another order than the convolution (float64: within 1e-12);
            ``benchmarks/check_fast_paths.py --patch-embed-gemm`` measures the deviation from the convolution, and
            ``benchmarks/throughput.py --patch-embed-gemm`` the speed (H100: the B->S step 6% faster,
            ``benchmarks/measured/2026-12-07_h100``). Off by default. A
            ViT whose patch embedding cannot run so (``dynamic_img_size``, padding, another embed layer) keeps its
            convolution, with a warning naming why. Checkpoints and weights are unchanged (same ``state_dict`` keys).
    """

    def __init__(
        self,
        backbone: BackboneConfig | None = None,
        prompt: PromptFactory | None = None,
        query_backbone: BackboneConfig | None = None,
        task_schedule: TaskSchedule | None = None,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.0,
        schedule: Literal["cosine", "constant"] = "cosine",
        reference_lr_off_by_one: bool = False,
        compile: bool = False,
        cast_frozen_weights: bool = True,
        cuda_graphs: bool = True,
        graph_prompts: bool = False,
        patch_embed_gemm: bool = False,
        task_sizes: list[int] | None = None,
        epochs_per_task: int | None = None,
        class_names: list[str] | None = None,
        class_order: list[int] | None = None,
    ) -> None:
        super().__init__()
        self.task_schedule = as_task_schedule(task_schedule, task_sizes, epochs_per_task, class_names, class_order)
        backbone = as_backbone_config(backbone) or BackboneConfig()
        query_backbone = as_backbone_config(query_backbone)
        self.save_hyperparameters(ignore=["prompt", "method", "task_schedule", *_OLD_TASK_FACTS])
        # plain values in checkpoints (weights-only loading); `cdl validate --ckpt_path` parses them back
        self.hparams["task_schedule"] = self.task_schedule.to_dict()
        self.backbone_config, self.query_config = backbone, query_backbone
        vit = backbone.build()
        query_vit = query_backbone.build() if query_backbone is not None else None
        key_dim = (query_vit or vit).embed_dim
        pool = prompt(vit.embed_dim, key_dim, self.num_tasks) if prompt is not None else None
        self.prompt_spec = pool.spec() if pool is not None else None
        # the factory itself may not be serialisable (a partial, a lambda): checkpoints name it as in a config, so
        # `cdl validate|test|predict --ckpt_path` (which re-reads these hyper-parameters) rebuilds the same pool
        self.hparams["prompt"] = pool.spec(exclude=("embed_dim", "key_dim", "num_tasks")) if pool is not None else None
        self.classifier = PromptedClassifier(vit, self.num_classes, pool, query_vit)
        self.method: DistillationMethod = NoDistillation()
        self.opened_task = -1
        self._labels_checked_task = -1
        self.task_snapshots: list[dict[str, Tensor]] = []
        self._pack_snapshots = SnapshotPacker()  # checkpoints store each snapshot as the rows its task changed
        self.strict_loading = False  # checkpoints omit the frozen backbone
        # the speed paths (casting, compile, CUDA graphs, patch embedding as a GEMM) as one component; its flags are
        # these arguments
        self.fast_paths = FastPaths(compile=compile, cast_frozen_weights=cast_frozen_weights, cuda_graphs=cuda_graphs,
                                    graph_prompts=graph_prompts, patch_embed_gemm=patch_embed_gemm)
        # at construction, so a model used without a trainer (`load_for_inference`, `cdl export`) runs as configured;
        # `Distiller` applies it to its teacher once built (its `frozen_vits` needs the teacher, not made yet)
        self.fast_paths.patch_embed_(self.classifier.frozen_modules())

    @classmethod
    def load_for_inference(cls, path: str, map_location: str | torch.device = "cpu") -> PromptLearner:
        """A trained learner or student from its checkpoint (or run folder) alone, in eval mode: no teacher, no
        optimizer state, no training-only parts (see `cdl_lightning.models.inference.load_for_inference`)."""
        from cdl_lightning.models.inference import load_for_inference

        return load_for_inference(path, map_location, expected_class=cls)

    # ----------------------------------------------------------------------------------------------- task bookkeeping
    @property
    def num_tasks(self) -> int:
        return self.task_schedule.num_tasks

    @property
    def num_classes(self) -> int:
        return self.task_schedule.num_classes

    @property
    def class_names(self) -> list[str]:
        """Class names in label order (what `PredictionWriter` writes)."""
        return list(self.task_schedule.names)

    @property
    def current_task(self) -> int:
        """The task being trained (during fit: ``task_schedule.task_of(current_epoch)``) or, otherwise, the last task
        this model learned (its last snapshot or opened task: what its weights know, however they were loaded)."""
        trainer = self._trainer
        if trainer is not None and trainer.state.fn == "fit":
            return self.task_schedule.task_of(trainer.current_epoch)
        return max(len(self.task_snapshots) - 1, self.opened_task, 0)

    def task_range(self, task: int) -> tuple[int, int]:
        """Label range ``[start, stop)`` of a task."""
        return self.task_schedule.task_range(task)

    def trainable_state(self) -> dict[str, Tensor]:
        """Detached copies of every trainable parameter (prompts, keys, heads, method parameters)."""
        return {name: p.detach().clone() for name, p in self.named_parameters() if p.requires_grad}

    def snapshot_task(self, task: int) -> None:
        """Record the trainable state after ``task`` (idempotent; earlier missing tasks are filled first)."""
        while len(self.task_snapshots) <= task:
            self.task_snapshots.append(
                {name: p.detach().to("cpu", copy=True) for name, p in self.named_parameters() if p.requires_grad}
            )

    def open_task(self, task: int) -> None:
        """Start ``task``: snapshot the finished ones, let the prompt pool open it, reset the optimizer state."""
        if task > 0:
            self.snapshot_task(task - 1)
        if self.classifier.prompt is not None:
            self.classifier.prompt.start_task(task)
        self.method.start_task(task)
        if self._trainer is not None:
            for optimizer in self.trainer.optimizers:
                optimizer.state.clear()
        self.opened_task = task

    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        task = self.current_task
        if task != self.opened_task:
            self.open_task(task)

    @override
    def on_validation_epoch_end(self) -> None:
        trainer = self.trainer
        last_epoch_of_task = self.task_schedule.is_last_epoch_of_task(trainer.current_epoch)
        if trainer.state.fn == "fit" and not trainer.sanity_checking and last_epoch_of_task:
            self.snapshot_task(self.current_task)

    @override
    def on_train_end(self) -> None:
        # the fit stopped at a task boundary (``current_epoch`` is the epoch count then): the open task is complete
        if self.opened_task >= 0 and self.task_schedule.epoch_in_task(self.trainer.current_epoch) == 0:
            self.snapshot_task(self.opened_task)

    def frozen_vits(self) -> list[PromptedViT]:
        """Every frozen ViT, each once (a distiller adds its teacher's): what ``compile``, ``cast_frozen_weights`` and
        ``patch_embed_gemm`` act on."""
        return self.classifier.frozen_modules()

    def cast_frozen_weights_(self, dtype: torch.dtype) -> None:
        """Store every frozen ViT's Linear/Conv weights in ``dtype`` (see ``cast_frozen_weights``); for Python loops
        that use ``torch.autocast`` themselves (a trainer does this in ``setup``)."""
        for vit in self.frozen_vits():
            vit.cast_matmul_weights_(dtype)

    @override
    def setup(self, stage: str) -> None:
        self.fast_paths.patch_embed_(self.frozen_vits())  # (again: the flag may have been flipped on the instance)
        self.fast_paths.cast(self.frozen_vits(), str(self.trainer.precision))

    @override
    def configure_model(self) -> None:
        self.fast_paths.compile_(self.frozen_vits(), self._loader_batch_sizes())

    def _loader_batch_sizes(self) -> tuple[int, ...]:
        """The trainer's data module's training and evaluation batch sizes, those it has (none without a trainer)."""
        try:
            datamodule = self.trainer.datamodule
        except (RuntimeError, AttributeError):  # not attached to a trainer; Fabric's trainer shim has no datamodule
            return ()
        sizes = (getattr(datamodule, "batch_size", None), getattr(datamodule, "eval_batch_size", None))
        return tuple(size for size in sizes if isinstance(size, int))

    # ----------------------------------------------------------------------------------------------------- forward
    @property
    def uses_cuda_graphs(self) -> bool:
        """``cuda_graphs`` is on (with ``compile`` too: the compiled gradient-free passes are then captured)."""
        return self.fast_paths.uses_cuda_graphs

    @property
    def graph_runners(self) -> dict[str, GraphedFunction | GraphedTrainingPass]:
        """The CUDA graph wrappers by name (`FastPaths.runners`)."""
        return self.fast_paths.runners

    def graphed(self, name: str, fn: Callable[..., tuple[Tensor, ...]], modules: list[torch.nn.Module]) -> Callable:
        """``fn`` run from CUDA graphs when ``cuda_graphs`` is on (a no-op wrapper off CUDA), created once per name."""
        return self.fast_paths.graphed(name, fn, modules)

    def _query_pass(self, images: Tensor) -> tuple[Tensor]:
        return (self.classifier.query(images),)

    def query(self, images: Tensor) -> Tensor:
        """The prompt query of ``images`` (the frozen query pass, no grad)."""
        with torch.no_grad():
            return self.graphed("query", self._query_pass, self.classifier.frozen_modules())(images)[0]

    def teacher_forward(self, images: Tensor, task: int, query: Tensor | None) -> ClassifierOutput | None:
        """The frozen teacher's output for this batch (a plain learner has none)."""
        return None

    def student_forward(self, images: Tensor, task: int, train: bool, query: Tensor | None = None) -> ClassifierOutput:
        inputs = self.method.student_inputs()
        run_backbone = self.fast_paths.training_pass(self.classifier.backbone, images.is_cuda) if train else None
        run_prompt = self.fast_paths.prompt_pass(self.classifier.prompt, images.is_cuda) if train else None
        return self.classifier(images, task, train, query=query, prefixes=inputs.prefixes, prepend=inputs.prepend,
                               append=inputs.append, return_blocks=train and self.method.needs_student_blocks,
                               run_backbone=run_backbone, run_prompt=run_prompt)

    def _logits_pass(self, images: Tensor, task: int) -> tuple[Tensor]:
        return (self.method.logits(self.student_forward(images, task, train=False))[:, : self.task_range(task)[1]],)

    def forward(self, images: Tensor, task: int | None = None) -> Tensor:
        """Inference logits over the classes of tasks ``0..task`` (default: all learned so far)."""
        task = self.current_task if task is None else task
        if torch.is_grad_enabled() or self.training:
            return self._logits_pass(images, task)[0]
        return self.graphed("logits", self._logits_pass, [self])(images, task=task)[0]

    def _check_labels(self, targets: Tensor, task: int, start: int, stop: int) -> None:
        if targets.numel() and (targets.min() < start or targets.max() >= stop):
            raise RuntimeError(f"batch labels {targets.min().item()}..{targets.max().item()} are outside task {task}'s "
                               f"range [{start}, {stop}): the data module and the model disagree on the task split")
        self._labels_checked_task = task

    @override
    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        images, targets, _ = batch
        task = self.current_task
        start, stop = self.task_range(task)
        if task != self._labels_checked_task:  # once per task: the check syncs with the device
            self._check_labels(targets, task, start, stop)
        query = self.query(images) if self.classifier.prompt is not None else None
        teacher = self.teacher_forward(images, task, query)  # may still run on a second stream (concurrent_teacher)
        student = self.student_forward(images, task, train=True, query=query)
        self.fast_paths.join()
        task_loss = self.method.loss(student, teacher, targets, start, stop)
        loss = task_loss + student.prompt_loss
        # the terms by name, as device tensors, for `callbacks.DivergenceCheck` (it reads them without a per-step sync)
        self.loss_terms = {"task loss" if not self.method.needs_teacher
                           else f"task loss ({type(self.method).__name__}: cross-entropy + distillation)":
                           task_loss.detach(), "prompt loss": student.prompt_loss.detach()}
        batch_size = images.shape[0]
        # never prog_bar=True: Lightning then reads the value with .item() after every step, a sync that leaves the GPU
        # idle while the next step is queued; `ThrottledRichProgressBar` shows the loss and the task without it.
        # The loss every step (callback_metrics: the bar, checkpoint monitors); the rest in on_train_batch_end, only
        # on the steps the logger writes (each self.log costs about 1 ms of host time)
        self.log("train/loss", loss, batch_size=batch_size)
        return loss

    @override
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # after the callbacks' hooks, so a callback that stops the run at this step (Lightning then writes this
        # step's metrics) is seen; the step's prompt loss is in `loss_terms`
        terms = getattr(self, "loss_terms", None)  # (absent when a subclass's training_step does not set it)
        if not terms or not self._logger_writes_this_step():
            return
        prompt_loss, batch_size = terms["prompt loss"], batch[0].shape[0]
        self.log("train/prompt_loss", prompt_loss, batch_size=batch_size)
        # filled on the device: a Python float would be copied to it, and that copy waits for the GPU
        task = torch.full((), float(self.current_task), device=prompt_loss.device)
        self.log("train/task", task, batch_size=batch_size)

    def _logger_writes_this_step(self) -> bool:
        """Whether the trainer's loggers write this training step's metrics: Lightning's own test
        (``_LoggerConnector.should_update_logs``: every ``log_every_n_steps``, and the step at which the run stops);
        ``True`` when the loggers never write (``log_every_n_steps=0``: ``callback_metrics`` is then the only
        reader) or when it cannot tell (no trainer, another Lightning version)."""
        trainer = self._trainer
        if trainer is None or not trainer.log_every_n_steps:
            return True
        try:
            return bool(trainer._logger_connector.should_update_logs)
        except (AttributeError, NotImplementedError):
            return True

    def _eval_step(self, batch: tuple[Tensor, Tensor, Tensor], task: int) -> dict[str, Tensor]:
        images, targets, task_ids = batch
        return {"logits": self(images, task).float(), "targets": targets, "task_ids": task_ids}

    @override
    def validation_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> dict[str, Tensor]:
        return self._eval_step(batch, self.current_task)

    @override
    def test_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> dict[str, Tensor]:
        return self._eval_step(batch, self.current_task)

    @override
    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        images, index = batch[0], batch[1]
        probs = F.softmax(self(images).float(), dim=1)
        scores, preds = probs.max(dim=1)
        return {"preds": preds, "scores": scores, "index": index}

    # --------------------------------------------------------------------------------------------------- optimizer
    @override
    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(params, lr=hp.lr, betas=tuple(hp.betas), weight_decay=hp.weight_decay)
        if hp.schedule == "constant":
            return {"optimizer": optimizer}
        tasks, quirk = self.task_schedule, hp.reference_lr_off_by_one
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda epoch: quarter_cosine(tasks.epoch_in_task(epoch), tasks.epochs_per_task, quirk)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    # -------------------------------------------------------------------------------------------------- checkpoints
    # Lightning 2.6.6 (`trainer/connectors/checkpoint_connector.py`): `dump_checkpoint` puts `optimizer_states` into
    # the dict (lines 461-467) before it calls this hook (line 510), and `Trainer.save_checkpoint` (called by
    # `ModelCheckpoint._save_checkpoint`, `callbacks/model_checkpoint.py` 600) hands the dict to the strategy's
    # checkpoint IO after the hook (`trainer.py` 1463-1464); `AsyncCheckpointIO` (`RunCheckpoint(background=True)`)
    # clones every tensor of it on the caller's thread before queueing the write (`plugins/io/async_plugin.py` 63-67).
    # On load, `restore_model` calls `on_load_checkpoint` (line 283, via `_restore_modules_and_callbacks`, `trainer.py`
    # 1046/1066) before `restore_training_state` (`trainer.py` 1070) reaches `restore_optimizers`, whose
    # `strategy.load_optimizer_state_dict` reads `checkpoint["optimizer_states"]` of the same dict (line 394;
    # `strategies/strategy.py` 375): the states unpacked there are the ones restored. (Not so under FSDPStrategy, which
    # restores optimizers inside `strategy.load_checkpoint`, before this hook: unsupported here; the first
    # `optimizer.step()` would fail on the packed dicts, not train on wrong state.)
    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        frozen = tuple(f"classifier.{name}." for name in self.classifier.frozen_module_names())
        for key in [k for k in state if k.startswith(frozen)]:
            del state[key]
        checkpoint["cdl"] = {
            "opened_task": self.opened_task,
            PACKED_KEY: self._pack_snapshots(self.task_snapshots),  # rows changed per task (`models.snapshots`)
            "prompt_spec": self.prompt_spec,
            "task_schedule": self.task_schedule.to_dict(),
        }
        if "optimizer_states" in checkpoint:  # absent from weights-only checkpoints
            # Adam's moments as their nonzero rows (`models.optimizer_state`): new dicts, the live state is untouched;
            # the packed values are copies (a background write's `AsyncCheckpointIO` clones every tensor anyway)
            checkpoint["optimizer_states"] = optimizer_state.pack_optimizer_states(checkpoint["optimizer_states"])
            checkpoint["cdl"][optimizer_state.PACKED_KEY] = True

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        cdl = checkpoint.get("cdl")
        if cdl is None:
            raise ValueError("this checkpoint was not written by a cdl-lightning PromptLearner/Distiller")
        sizes = checkpoint_task_schedule(checkpoint).task_sizes
        if sizes != self.task_schedule.task_sizes:
            raise ValueError(f"checkpoint task sizes {list(sizes)} differ from the model's "
                             f"{list(self.task_schedule.task_sizes)}")
        if cdl.get(optimizer_state.PACKED_KEY) and "optimizer_states" in checkpoint:
            # in the dict Lightning restores the optimizers from next (see the comment above on_save_checkpoint)
            checkpoint["optimizer_states"] = optimizer_state.unpack_optimizer_states(checkpoint["optimizer_states"])
        self.opened_task = cdl["opened_task"]
        self.task_snapshots = checkpoint_snapshots(cdl)
        if self.opened_task >= 0 and self.classifier.prompt is not None:
            # restore the pool's notion of the open task without re-drawing (the weights come from the checkpoint)
            self.classifier.prompt.task = self.opened_task
        if self.opened_task >= 0:
            self.method.start_task(self.opened_task)  # task-dependent method state (e.g. a temperature schedule)
        state = checkpoint["state_dict"]
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        missing, unexpected = sorted(trainable - set(state)), sorted(set(state) - set(self.state_dict()))
        if missing or unexpected:
            raise ValueError(f"checkpoint does not fit the model (missing {missing[:5]}, unexpected {unexpected[:5]}): "
                             "it was written by another configuration (prompt pool, distillation method, head size)")
