"""CODA-Prompt: COntinual Decomposed Attention-based Prompting (Smith et al., CVPR 2023)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cdl_lightning.nn.prompts.base import PromptOutput, PromptPool


@torch.no_grad()
def gram_schmidt_(weight: Tensor, start: int, stop: int, generator: torch.Generator | None = None) -> None:
    """Re-draw rows ``[start, stop)`` of ``weight`` (``N x ...``) in place from N(0, 1), orthogonalised (Gram-Schmidt)
    against the span of rows ``[0, start)`` and each other, and normalised to unit length (the reference projects
    onto the raw old rows, which is only exact while they are still orthogonal; we use an orthonormal basis of their
    span, so the new slice stays orthogonal after the old components trained); rows outside the slice are
    untouched. Rows are flattened, so a ``N x L x D`` prompt tensor is treated as ``N`` vectors of ``L*D``.

    Raises:
        ValueError: ``stop`` exceeds the vector dimension (no room for that many orthogonal vectors).
    """
    flat = weight.view(weight.shape[0], -1)
    dim = flat.shape[1]
    if stop > dim:
        raise ValueError(f"cannot orthogonalise {stop} components in {dim} dimensions: use a pool no larger than the "
                         "component width (key/attention width, prompt length x embed dim)")
    old = flat[:start].double()
    # an orthonormal basis of the old components' span (they may have drifted from orthogonality while training)
    basis = torch.linalg.qr(old[old.norm(dim=1) > 0].T).Q.T if start else old
    new = torch.randn(stop - start, dim, generator=generator, dtype=torch.float64, device="cpu").to(flat.device)
    rows = []
    for vector in new:
        for _ in range(2):  # re-orthogonalise once more for numerical safety
            vector = vector - (basis @ vector) @ basis
        vector = vector / vector.norm()
        rows.append(vector)
        basis = torch.cat([basis, vector[None]], 0)
    flat[start:stop] = torch.stack(rows).to(flat.dtype)


def ortho_penalty(rows: Tensor) -> Tensor:
    """CODA-Prompt's orthogonality penalty ``mean((M M^T - I)^2)`` of the ``n`` rows of ``M`` (flattened to vectors),
    averaged over the ``n x n`` entries as the reference's ``ortho_penalty`` does."""
    flat = rows.reshape(rows.shape[0], -1).float()
    eye = torch.eye(flat.shape[0], device=flat.device)
    return ((flat @ flat.T - eye) ** 2).mean()


class CodaPrompt(PromptPool):
    """Prompts assembled as a query-weighted sum of orthogonal components, with a component slice per task.

    Per prompted layer: keys ``K`` (``N x d_q``), attention vectors ``A`` (``N x d_q``) and components ``P``
    (``N x L x D``). Weights ``alpha_k = cos(q * A_k, K_k)`` (no softmax); prompt ``= sum_k alpha_k P_k``, split into
    ``L/2`` key and ``L/2`` value rows. Task ``t`` owns components ``[c t, c (t+1))`` with ``c = components_per_task``.
    When it starts, that slice of ``K``, ``A`` and ``P`` is re-drawn and Gram-Schmidt-orthogonalised against the
    earlier components. Training uses ``[0, c t)`` detached plus the trainable current slice; evaluation uses
    ``[0, c (t+1))``. Auxiliary loss: ``ortho_weight`` times the orthogonality penalty `ortho_penalty`
    ``mean((M M^T - I)^2)`` of the rows in use, ``M`` in ``{K, A, P}``, summed over layers; as in the reference the
    past tasks' rows enter detached, so the penalty never moves frozen components (the reference's weight is 0).

    Args:
        embed_dim: width of the prompted ViT.
        key_dim: width of the query.
        num_tasks: number of tasks.
        pool_size: number of components per layer (reference 100).
        length: prompt length (reference 8: 4 key rows, 4 value rows).
        layers: prompted blocks (reference ``(0, 1, 2, 3, 4)``).
        components_per_task: components owned by each task; ``None`` = ``pool_size // num_tasks`` (the reference's).
        ortho_weight: weight of the orthogonality penalty (reference 0).
        seed: seed of the component re-draws (so runs are reproducible whatever else uses the global RNG).
    """

    def __init__(
        self,
        embed_dim: int,
        key_dim: int,
        num_tasks: int,
        pool_size: int = 100,
        length: int = 8,
        layers: tuple[int, ...] = (0, 1, 2, 3, 4),
        components_per_task: int | None = None,
        ortho_weight: float = 0.0,
        seed: int = 0,
    ) -> None:
        super().__init__(embed_dim, key_dim, num_tasks)
        if length % 2:
            raise ValueError(f"CODA-Prompt length must be even, got {length}")
        self.components_per_task = components_per_task or pool_size // num_tasks
        if self.components_per_task < 1 or self.components_per_task * num_tasks > pool_size:
            raise ValueError(f"CODA-Prompt pool_size={pool_size} cannot give {self.components_per_task} components to "
                             f"each of {num_tasks} tasks")
        if pool_size > key_dim:
            raise ValueError(f"CODA-Prompt pool_size={pool_size} exceeds the key width {key_dim}: the components "
                             "cannot be orthogonal; use a smaller pool")
        self._layers = self._check_layers(tuple(layers), "CODA-Prompt layers")
        self.ortho_weight = ortho_weight
        self.seed = seed
        n = len(self._layers)
        self.keys = nn.Parameter(torch.zeros(n, pool_size, key_dim))
        self.attention = nn.Parameter(torch.zeros(n, pool_size, key_dim))
        self.components = nn.Parameter(torch.zeros(n, pool_size, length, embed_dim))
        self.task = 0  # the last opened task (for inspection; forward takes the task explicitly)
        self._draw(0)

    @property
    def layers(self) -> tuple[int, ...]:
        return self._layers

    def task_slice(self, task: int) -> tuple[int, int]:
        """Component range ``[start, stop)`` owned by ``task``."""
        c = self.components_per_task
        return c * task, c * (task + 1)

    def _draw(self, task: int) -> None:
        start, stop = self.task_slice(task)
        generator = torch.Generator().manual_seed(self.seed * 1000 + task)
        for i in range(len(self._layers)):
            for weight in (self.keys, self.attention, self.components):
                gram_schmidt_(weight.data[i], start, stop, generator)

    def start_task(self, task: int) -> None:
        """Re-draw the new task's component slice (task 0's was drawn at construction)."""
        if task > 0:
            self._draw(task)
        self.task = task

    def in_use(self, weight: Tensor, layer_index: int, task: int, train: bool) -> Tensor:
        """Rows ``[0, c (t+1))`` of a layer's ``weight``; in training the past tasks' rows ``[0, c t)`` are detached."""
        start, stop = self.task_slice(task)
        rows = weight[layer_index, :stop]
        return torch.cat([rows[:start].detach(), rows[start:]]) if train and start > 0 else rows

    def weights(self, query: Tensor, layer_index: int, task: int, train: bool) -> Tensor:
        """``alpha = cos(q * A_k, K_k)`` for the components in use: ``B x n_used``."""
        keys = self.in_use(self.keys, layer_index, task, train)
        attention = self.in_use(self.attention, layer_index, task, train)
        attended = F.normalize(query.float()[:, None, :] * attention.float()[None], dim=-1)  # B x n x d
        return torch.einsum("bnd,nd->bn", attended, F.normalize(keys.float(), dim=-1))

    def forward(self, query: Tensor, task: int, train: bool) -> PromptOutput:
        prefixes = {}
        loss = query.new_zeros((), dtype=torch.float32)
        for i, layer in enumerate(self._layers):
            alpha = self.weights(query, i, task, train)
            components = self.in_use(self.components, i, task, train)
            prompt = torch.einsum("bn,nld->bld", alpha.to(components.dtype), components)
            prefixes[layer] = self.split_prefix(prompt)
            if train and self.ortho_weight > 0:
                # past tasks' rows are detached (frozen), as in the forward pass: only the current slice is pushed
                for weight in (self.keys, self.attention, self.components):
                    loss = loss + self.ortho_weight * ortho_penalty(self.in_use(weight, i, task, train))
        return PromptOutput(prefixes=prefixes, loss=loss)
