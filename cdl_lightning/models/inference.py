"""A trained learner or student as a model to serve: loaded from its checkpoint alone, and its inference forward as a
plain module (what `cdl_lightning.export` traces).

A student run's checkpoint holds everything the student needs at inference (prompts, keys, head, the method's
inference parts such as KDP's KD prompts and KD head) plus the identity of its frozen backbone (timm name, weights
file or seed); it never holds the teacher. `load_for_inference` rebuilds the model from it without the teacher run,
without optimizer state and without training-only parts.
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from cdl_lightning.models.learner import PromptLearner
from cdl_lightning.nn.kd import DistillationMethod
from cdl_lightning.nn.prompts.base import PromptPool
from cdl_lightning.nn.spec import build_from_spec


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or a run folder whose ``checkpoints/last.ckpt`` is taken."""
    file = Path(path).expanduser()
    if file.is_dir():
        file = file / "checkpoints" / "last.ckpt"
    if not file.is_file():
        raise FileNotFoundError(f"no checkpoint at {str(path)!r}: pass a run's checkpoint file or its run folder "
                                "(which holds checkpoints/last.ckpt)")
    return file


class _PromptFactory:
    """A prompt pool factory ``(embed_dim, key_dim, num_tasks) -> PromptPool`` from the spec a checkpoint stores."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec

    def __call__(self, embed_dim: int, key_dim: int, num_tasks: int) -> PromptPool:
        return build_from_spec(self.spec, PromptPool, embed_dim=embed_dim, key_dim=key_dim, num_tasks=num_tasks)


def _model_class(hparams: dict[str, Any]) -> type[PromptLearner]:
    class_path = hparams.get("_class_path")
    if class_path:
        module, _, name = class_path.rpartition(".")
        cls = getattr(importlib.import_module(module), name)
    else:
        from cdl_lightning.models.distiller import Distiller

        cls = Distiller if "method" in hparams else PromptLearner
    if not (isinstance(cls, type) and issubclass(cls, PromptLearner)):
        raise TypeError(f"{class_path} is not a PromptLearner")
    return cls


def load_for_inference(
    path: str | Path, map_location: str | torch.device = "cpu", expected_class: type[PromptLearner] = PromptLearner
) -> PromptLearner:
    """Rebuild a trained `PromptLearner` or `Distiller` student from its checkpoint alone, in eval mode.

    A distiller's student is built with ``inference_only=True``: its teacher checkpoint is not needed (the teacher
    run may be gone), and training-only parts (FitNets/ReviewKD adapters) are left out. No optimizer state is used
    (`on_load_checkpoint` unpacks a packed one, `cdl_lightning.models.optimizer_state`, and nothing reads it).
    The frozen backbone is rebuilt from the identity in the checkpoint (timm name, ``checkpoint_path`` or
    ``pretrained`` weights, ``init_seed``), so a weights file it names must still exist.

    Args:
        path: a checkpoint file or a run folder (its ``checkpoints/last.ckpt``).
        map_location: device of the returned model.
        expected_class: refuse a checkpoint whose model is not this class or a subclass of it.
    """
    file = resolve_checkpoint(path)
    checkpoint = torch.load(file, map_location="cpu", weights_only=True)
    if "cdl" not in checkpoint or "hyper_parameters" not in checkpoint:
        raise ValueError(f"{file} was not written by a cdl-lightning PromptLearner/Distiller")
    hparams = dict(checkpoint["hyper_parameters"])
    cls = _model_class(hparams)
    if not issubclass(cls, expected_class):
        raise TypeError(f"{file} holds a {cls.__name__}, not a {expected_class.__name__}: use "
                        f"{cls.__name__}.load_for_inference (or PromptLearner.load_for_inference for any)")
    accepted = inspect.signature(cls.__init__).parameters
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    kwargs = {k: v for k, v in hparams.items() if not k.startswith("_") and (k in accepted or takes_kwargs)}
    if kwargs.get("prompt") is not None:
        kwargs["prompt"] = _PromptFactory(kwargs["prompt"])
    if isinstance(kwargs.get("method"), dict):
        kwargs["method"] = build_from_spec(kwargs["method"], DistillationMethod)
    if "inference_only" in accepted:
        kwargs["inference_only"] = True
    model = cls(**kwargs)
    model.on_load_checkpoint(checkpoint)  # task bookkeeping; checks the state fits; drops training-only parts
    model.load_state_dict(checkpoint["state_dict"], strict=False)  # the frozen backbone is not in checkpoints
    model.checkpoint_path = str(file)
    return model.eval().to(map_location)


class InferenceGraph(nn.Module):
    """A learner's inference forward as a plain module, ``images -> logits`` over the classes of tasks ``0..task``:
    prompt selection as at evaluation (L2P top-k, DualPrompt argmax, CODA's weighted components), a distillation
    method's inference logits (KDP/DeiT: ``(1 - alpha) CLS head + alpha KD head``), normalisation inside.

    Args:
        model: a trained learner or student (e.g. from `load_for_inference`).
        task: the last task whose classes the logits cover; ``None`` = the last learned task.
        input_dtype: ``"float32"``: images in ``[0, 1]``; ``"uint8"``: images in ``0..255``, divided by 255 inside.
    """

    def __init__(
        self, model: PromptLearner, task: int | None = None, input_dtype: Literal["float32", "uint8"] = "float32"
    ) -> None:
        super().__init__()
        if input_dtype not in ("float32", "uint8"):
            raise ValueError(f"input_dtype must be 'float32' or 'uint8', got {input_dtype!r}")
        self.task = model.current_task if task is None else task
        if not 0 <= self.task < model.num_tasks:
            raise ValueError(f"task {self.task} is outside the model's {model.num_tasks} tasks")
        self.model = model
        self.input_dtype = input_dtype
        self.num_classes = model.task_schedule.task_range(self.task)[1]

    @property
    def input_size(self) -> tuple[int, int]:
        """``(height, width)`` the backbone takes."""
        size = self.model.classifier.backbone.vit.patch_embed.img_size
        return (int(size[0]), int(size[1])) if isinstance(size, (tuple, list)) else (int(size), int(size))

    def forward(self, images: Tensor) -> Tensor:
        if self.input_dtype == "uint8":
            images = images.to(torch.float32) / 255.0
        model = self.model
        return model.method.logits(model.student_forward(images, self.task, train=False))[:, : self.num_classes]
