"""L2P: Learning to Prompt for Continual Learning (Wang et al., CVPR 2022), as configured in the CODA-Prompt code."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cdl_lightning.nn.prompts.base import PromptOutput, PromptPool


class L2P(PromptPool):
    """A pool of prompts chosen per sample by key-query cosine similarity (top-k), prefixed at a few layers.

    For a query ``q`` the ``top_k`` keys with the highest ``cos(q, K_i)`` are selected; their prompts (each
    ``length x D``) are split into ``length/2`` key rows and ``length/2`` value rows and concatenated
    (``top_k * length/2`` rows each) into the prefix of every layer in ``layers``.
    Auxiliary loss: ``mean_b sum_{i in topk(b)} (1 - cos(q_b, K_i))``.

    Args:
        embed_dim: width of the prompted ViT.
        key_dim: width of the query.
        num_tasks: number of tasks (unused by L2P's selection, kept for the common interface).
        pool_size: number of prompts/keys in the pool (reference 30).
        length: prompt length, split half into key and half into value rows (reference 20).
        top_k: prompts chosen per sample (reference 5).
        layers: blocks that receive the prefix (reference ``(0,)``).
        init: ``"uniform"`` U(0, 1) as in the reference, or ``"normal"`` N(0, 0.02).
    """

    def __init__(
        self,
        embed_dim: int,
        key_dim: int,
        num_tasks: int,
        pool_size: int = 30,
        length: int = 20,
        top_k: int = 5,
        layers: tuple[int, ...] = (0,),
        init: str = "uniform",
    ) -> None:
        super().__init__(embed_dim, key_dim, num_tasks)
        if length % 2:
            raise ValueError(f"L2P length must be even (half keys, half values), got {length}")
        if not 1 <= top_k <= pool_size:
            raise ValueError(f"L2P top_k must be in [1, pool_size={pool_size}], got {top_k}")
        self._layers = self._check_layers(tuple(layers), "L2P layers")
        self.top_k = top_k
        self.keys = nn.Parameter(torch.empty(len(self._layers), pool_size, key_dim))
        self.prompts = nn.Parameter(torch.empty(len(self._layers), pool_size, length, embed_dim))
        for p in (self.keys, self.prompts):
            nn.init.uniform_(p) if init == "uniform" else nn.init.normal_(p, std=0.02)

    @property
    def layers(self) -> tuple[int, ...]:
        return self._layers

    def forward(self, query: Tensor, task: int, train: bool) -> PromptOutput:
        prefixes = {}
        loss = query.new_zeros((), dtype=torch.float32)
        selected = None
        for i, layer in enumerate(self._layers):
            cos = F.normalize(query.float(), dim=-1) @ F.normalize(self.keys[i].float(), dim=-1).T  # B x pool
            top = cos.topk(self.top_k, dim=1)
            selected = top.indices
            loss = loss + (1.0 - top.values).sum(dim=1).mean()
            prefixes[layer] = self.split_prefix(self.prompts[i][top.indices])  # B x k x L x D
        return PromptOutput(prefixes=prefixes, loss=loss, selected=selected)
