"""A prompt learner as one pure-torch module: frozen ViT + query encoder + prompt pool + linear head."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from cdl_lightning.nn.prompts.base import PromptOutput, PromptPool
from cdl_lightning.nn.vit import Prefix, PromptedViT, ViTOutput, merge_prefixes


@dataclass
class ClassifierOutput:
    """Attributes:
    logits: class-token head logits ``B x num_classes`` (all classes; callers cut them to the seen ones).
    features: final-norm class-token features ``B x D``.
    tokens: final-norm tokens ``B x N x D``.
    blocks: every block's output (before the final norm), if requested.
    prompt_loss: the prompt learner's auxiliary loss.
    """

    logits: Tensor
    features: Tensor
    tokens: Tensor
    prompt_loss: Tensor
    blocks: list[Tensor] = field(default_factory=list)

    def as_tuple(self) -> tuple[Tensor, ...]:
        """``(logits, features, tokens, prompt_loss, *blocks)`` (what a CUDA-graphed pass returns)."""
        return self.logits, self.features, self.tokens, self.prompt_loss, *self.blocks

    @classmethod
    def from_tuple(cls, values: tuple[Tensor, ...]) -> ClassifierOutput:
        logits, features, tokens, prompt_loss, *blocks = values
        return cls(logits, features, tokens, prompt_loss, list(blocks))


class PromptedClassifier(nn.Module):
    """Frozen ViT prompted by a `PromptPool` whose prompts are chosen by a frozen query encoder, plus a linear head.

    Frozen is decided here, once: the backbone and the query encoder never require grad and stay in eval mode
    whatever ``train()`` is called with; the prompt pool and the head are the trainable state.

    Args:
        backbone: the frozen prompted ViT.
        num_classes: total classes over the task sequence (head width).
        prompt: the prompt learner; ``None`` gives a linear probe (the baseline continual learner).
        query_encoder: frozen ViT whose class token is the prompt query; ``None`` uses ``backbone`` without prompts.
    """

    def __init__(
        self,
        backbone: PromptedViT,
        num_classes: int,
        prompt: PromptPool | None = None,
        query_encoder: PromptedViT | None = None,
    ) -> None:
        super().__init__()
        if prompt is not None and any(layer >= backbone.depth for layer in prompt.layers):
            raise ValueError(f"{type(prompt).__name__} prompts layers {list(prompt.layers)} but the backbone has only "
                             f"{backbone.depth} blocks: choose layers below {backbone.depth}")
        self.backbone = backbone
        self.query_encoder = query_encoder if query_encoder is not None and query_encoder is not backbone else None
        self.prompt = prompt
        self.head = nn.Linear(backbone.embed_dim, num_classes)
        for frozen in self.frozen_modules():
            frozen.requires_grad_(False)
            frozen.eval()

    def frozen_module_names(self) -> list[str]:
        """The child modules that never train (the one place that decides what is frozen)."""
        return [name for name in ("backbone", "query_encoder") if getattr(self, name) is not None]

    def frozen_modules(self) -> list[nn.Module]:
        return [getattr(self, name) for name in self.frozen_module_names()]

    def train(self, mode: bool = True) -> PromptedClassifier:
        super().train(mode)
        for frozen in self.frozen_modules():
            frozen.eval()
        return self

    def trainable_state(self) -> dict[str, Tensor]:
        """Detached copies of the parameters that train (prompt pool and head)."""
        return {name: p.detach().clone() for name, p in self.named_parameters() if p.requires_grad}

    @property
    def query_dim(self) -> int:
        return (self.query_encoder or self.backbone).embed_dim

    @torch.no_grad()
    def query(self, images: Tensor) -> Tensor:
        """The prompt query (one frozen pass without prompts)."""
        return (self.query_encoder or self.backbone).query(images)

    def forward(
        self,
        images: Tensor,
        task: int,
        train: bool,
        query: Tensor | None = None,
        prefixes: dict[int, Prefix] | None = None,
        prepend: Tensor | None = None,
        append: Tensor | None = None,
        return_blocks: bool = False,
        run_backbone: Callable[..., ViTOutput] | None = None,
        run_prompt: Callable[..., PromptOutput] | None = None,
    ) -> ClassifierOutput:
        """Classify ``[0, 1]`` images.

        Args:
            images: ``B x 3 x H x W``.
            task: the current task (selects prompt slices / task prompts).
            train: training behaviour of the prompt learner (true task id, trainable slices).
            query: a precomputed query (shared between models with the same query encoder); computed if ``None``.
            prefixes: extra per-layer prefixes merged with the prompts (e.g. KD prefixes).
            prepend: extra tokens before the class token (DeiT distillation token).
            append: extra tokens at the end of the sequence (KDP KD token).
            return_blocks: also return every block's output.
            run_backbone: runs the backbone pass instead of ``self.backbone`` (same arguments and result), e.g. a
                `GraphedTrainingPass` of it.
            run_prompt: runs the prompt pool instead of ``self.prompt`` (same arguments and result), e.g. a
                `GraphedPromptPass` of it.
        """
        prompt_loss = images.new_zeros((), dtype=torch.float32)
        prompt_prefixes = None
        if self.prompt is not None:
            out = (run_prompt or self.prompt)(self.query(images) if query is None else query, task, train)
            prompt_prefixes, prompt_loss = out.prefixes, out.loss
        run = run_backbone or self.backbone
        vit_out = run(images, merge_prefixes(prompt_prefixes, prefixes), prepend, append, return_blocks)
        cls_index = 0 if prepend is None else prepend.shape[1]
        features = vit_out.tokens[:, cls_index]
        return ClassifierOutput(
            logits=self.head(features),
            features=features,
            tokens=vit_out.tokens,
            prompt_loss=prompt_loss,
            blocks=vit_out.blocks,
        )
