"""The interface shared by the prompt learners (L2P, DualPrompt, CODA-Prompt)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from cdl_lightning.nn.spec import RecordsInitArgs, build_from_spec
from cdl_lightning.nn.vit import Prefix


@dataclass
class PromptOutput:
    """Prompts for one batch.

    Attributes:
        prefixes: ``{layer: (Pk, Pv)}`` key/value prefixes, each ``B x L x D``.
        loss: the prompt learner's auxiliary loss (a scalar; zero when it has none).
        selected: indices of the chosen pool entries, for inspection (``B x k``), if the learner selects.
    """

    prefixes: dict[int, Prefix]
    loss: Tensor
    selected: Tensor | None = None


class PromptPool(RecordsInitArgs, nn.Module):
    """Base class of prompt learners. All parameters exist from construction; a task only changes which slices are
    used or trained, never the parameter set (this keeps DDP, checkpoints and resume simple).

    Subclasses implement `forward` and may override `start_task`.

    Args:
        embed_dim: width ``D`` of the prompted ViT.
        key_dim: width ``d_q`` of the query encoder's class token (the keys' width).
        num_tasks: number of tasks in the sequence.
    """

    def __init__(self, embed_dim: int, key_dim: int, num_tasks: int) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.key_dim = key_dim
        self.num_tasks = num_tasks

    @property
    def layers(self) -> tuple[int, ...]:
        """The blocks that receive a prefix."""
        raise NotImplementedError

    def start_task(self, task: int) -> None:
        """Called once when task ``task`` starts (before its first optimizer step)."""

    def forward(self, query: Tensor, task: int, train: bool) -> PromptOutput:
        """Prompts for a batch of queries ``B x d_q``; ``task`` is the current (training) task."""
        raise NotImplementedError

    @staticmethod
    def split_prefix(prompt: Tensor) -> Prefix:
        """Split a prompt ``B x L x D`` (or ``B x k x L x D``) into ``L/2`` key and ``L/2`` value rows per entry."""
        half = prompt.shape[-2] // 2
        batch, dim = prompt.shape[0], prompt.shape[-1]
        keys = prompt[..., :half, :].reshape(batch, -1, dim)
        values = prompt[..., half:, :].reshape(batch, -1, dim)
        return keys, values

    @staticmethod
    def _check_layers(layers: tuple[int, ...], name: str) -> tuple[int, ...]:
        if len(set(layers)) != len(layers) or any(layer < 0 for layer in layers):
            raise ValueError(f"{name} must be distinct non-negative block indices, got {list(layers)}")
        return tuple(layers)


def build_prompt_pool(spec: dict[str, Any]) -> PromptPool:
    """Rebuild a prompt pool from `PromptPool.spec` (e.g. the teacher's, read from its checkpoint)."""
    return build_from_spec(spec, PromptPool)
