"""DualPrompt: Complementary Prompting for Rehearsal-free Continual Learning (Wang et al., ECCV 2022)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cdl_lightning.nn.prompts.base import PromptOutput, PromptPool


class DualPrompt(PromptPool):
    """A shared G(eneral)-prompt in the first layers and a task-keyed E(xpert)-prompt pool in later layers.

    Training uses the true task id to pick the E-prompt (and trains only that entry and its key); evaluation picks
    the E-prompt whose key best matches the query (top-1 cosine), separately per E-layer (the reference keeps one
    key set per layer). Auxiliary loss: ``sum_{E-layers} mean_b (1 - cos(q_b, K[task]))``.

    Args:
        embed_dim: width of the prompted ViT.
        key_dim: width of the query.
        num_tasks: number of tasks; must not exceed ``pool_size``.
        g_length: G-prompt length per layer (reference 6: 3 key rows, 3 value rows).
        g_layers: blocks with a G-prompt (reference ``(0, 1)``).
        pool_size: E-prompt pool size (reference 10).
        e_length: E-prompt length (reference 20).
        e_layers: blocks with an E-prompt (reference ``(2, 3, 4)``).
        init: ``"uniform"`` U(0, 1) as in the reference, or ``"normal"`` N(0, 0.02).
    """

    def __init__(
        self,
        embed_dim: int,
        key_dim: int,
        num_tasks: int,
        g_length: int = 6,
        g_layers: tuple[int, ...] = (0, 1),
        pool_size: int = 10,
        e_length: int = 20,
        e_layers: tuple[int, ...] = (2, 3, 4),
        init: str = "uniform",
    ) -> None:
        super().__init__(embed_dim, key_dim, num_tasks)
        if g_length % 2 or e_length % 2:
            raise ValueError(f"DualPrompt lengths must be even, got g_length={g_length}, e_length={e_length}")
        if num_tasks > pool_size:
            raise ValueError(f"DualPrompt needs one E-prompt per task: pool_size={pool_size} < num_tasks={num_tasks}")
        self.g_layers = self._check_layers(tuple(g_layers), "DualPrompt g_layers")
        self.e_layers = self._check_layers(tuple(e_layers), "DualPrompt e_layers")
        self.g_prompts = nn.Parameter(torch.empty(len(self.g_layers), g_length, embed_dim))
        self.e_keys = nn.Parameter(torch.empty(len(self.e_layers), pool_size, key_dim))
        self.e_prompts = nn.Parameter(torch.empty(len(self.e_layers), pool_size, e_length, embed_dim))
        for p in (self.g_prompts, self.e_keys, self.e_prompts):
            nn.init.uniform_(p) if init == "uniform" else nn.init.normal_(p, std=0.02)

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted(set(self.g_layers) | set(self.e_layers)))

    def forward(self, query: Tensor, task: int, train: bool) -> PromptOutput:
        batch = query.shape[0]
        prefixes = {}
        for i, layer in enumerate(self.g_layers):
            prefixes[layer] = self.split_prefix(self.g_prompts[i].unsqueeze(0).expand(batch, -1, -1))
        loss = query.new_zeros((), dtype=torch.float32)
        q = F.normalize(query.float(), dim=-1)
        selected = None
        for i, layer in enumerate(self.e_layers):
            keys = F.normalize(self.e_keys[i].float(), dim=-1)
            if train:
                loss = loss + (1.0 - q @ keys[task]).mean()
                selected = torch.full((batch, 1), task, device=query.device, dtype=torch.long)
            else:
                selected = (q @ keys.T).argmax(dim=1, keepdim=True)
            e_prefix = self.split_prefix(self.e_prompts[i][selected])  # B x 1 x L x D
            if layer in prefixes:  # a layer with both G and E prompts gets both
                g_k, g_v = prefixes[layer]
                e_prefix = (torch.cat([g_k, e_prefix[0]], 1), torch.cat([g_v, e_prefix[1]], 1))
            prefixes[layer] = e_prefix
        return PromptOutput(prefixes=prefixes, loss=loss, selected=selected)
