"""A seeded, shardable, mid-epoch resumable training loader.

Lightning 2.x saves ``state_dict()`` of every training dataloader that has ``state_dict``/``load_state_dict`` (the
``_Stateful`` protocol) under ``loops.fit_loop.state_dict.combined_loader`` of a checkpoint, and on resume calls
``load_state_dict`` on the freshly built loader before creating its iterator (``FitLoop.setup_data``). For a loader with
a length, Lightning's fetcher does not prefetch, so "batches yielded" equals "batches consumed by training steps" when a
checkpoint is written.

`ResumableSampler` is a ``DistributedSampler`` subclass, so Lightning does not replace it under DDP; it shards one
global permutation of ``(seed, epoch)`` over the ranks itself (padding by wrap-around, like ``DistributedSampler``).
`ResumableDataLoader` counts the batches it yields; after ``load_state_dict`` its next iteration starts where the saved
one stopped, without loading the skipped samples, in the same order as an uninterrupted run.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, DistributedSampler

__all__ = ["ResumableSampler", "ResumableDataLoader", "derive_seed"]


def derive_seed(*values: int) -> int:
    """A 63-bit seed mixed from integers (``numpy.random.SeedSequence``), stable across processes and platforms."""
    return int(np.random.SeedSequence([int(v) & 0xFFFFFFFF for v in values]).generate_state(2, np.uint64)[0] >> 1)


class ResumableSampler(DistributedSampler):
    """Indices of one epoch: a permutation seeded by ``(seed, epoch)``, sharded over ``num_replicas`` ranks.

    Args:
        num_samples: Size of the dataset.
        seed: Base seed.
        epoch: Epoch of this sampler (part of the permutation's seed).
        num_replicas: Number of ranks (DDP world size).
        rank: This rank.
        shuffle: Permute (else the natural order).
        drop_last: Drop the tail that does not divide evenly over ranks (else pad by repeating the start).

    ``start`` (set by `ResumableDataLoader`) skips that many of this rank's indices in the next iteration only
    (reset to 0 when read). ``set_epoch`` (called by Lightning
    every epoch) is accepted; the datamodule builds a new sampler per epoch anyway.
    """

    def __init__(
        self,
        num_samples: int,
        seed: int = 0,
        epoch: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
    ) -> None:
        # DistributedSampler.__init__ would query torch.distributed; set its attributes directly instead.
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        self.dataset_size = int(num_samples)
        self.seed, self.epoch = int(seed), int(epoch)
        self.num_replicas, self.rank = int(num_replicas), int(rank)
        self.shuffle, self.drop_last = shuffle, drop_last
        if drop_last:
            self.num_samples = self.dataset_size // self.num_replicas
        else:
            self.num_samples = math.ceil(self.dataset_size / self.num_replicas)
        self.total_size = self.num_samples * self.num_replicas
        self.start = 0

    def indices(self) -> list[int]:
        """All of this rank's indices for the epoch (ignores ``start``)."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch))
            order = torch.randperm(self.dataset_size, generator=generator).tolist()
        else:
            order = list(range(self.dataset_size))
        if self.total_size > len(order) and order:
            order += (order * math.ceil(self.total_size / len(order)))[: self.total_size - len(order)]
        return order[: self.total_size][self.rank : self.total_size : self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        start, self.start = self.start, 0  # consumed by the iteration it was set for
        return iter(self.indices()[start:])

    def __len__(self) -> int:
        return self.num_samples

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` over a `ResumableSampler` that can stop and resume mid-epoch.

    ``state_dict()`` records the sampler's epoch/seed/shard and how many batches the current (or last) iteration
    yielded; ``load_state_dict()`` makes the next iteration skip exactly those batches when the epoch and shard match
    (a state from another epoch, e.g. saved at an epoch end, is ignored). ``len()`` stays the full epoch length, as
    Lightning expects (its progress counters already hold the consumed batches).

    Args:
        dataset: A map-style dataset.
        sampler: Its `ResumableSampler`.
        **kwargs: Any other ``DataLoader`` argument (``batch_size``, ``num_workers``, ``generator``, ...).
    """

    def __init__(self, dataset: Any, sampler: ResumableSampler, **kwargs: Any) -> None:
        if not isinstance(sampler, ResumableSampler):
            raise TypeError(f"sampler must be a ResumableSampler, got {type(sampler).__name__}")
        super().__init__(dataset, sampler=sampler, **kwargs)
        self._batches_yielded = 0
        self._resume_batches = 0

    def __iter__(self) -> Iterator[Any]:
        sampler: ResumableSampler = self.sampler  # type: ignore[assignment]
        start, self._resume_batches = self._resume_batches, 0
        sampler.start = start * (self.batch_size or 1)
        self._batches_yielded = start
        return self._count(super().__iter__())

    def _count(self, iterator: Iterator[Any]) -> Iterator[Any]:
        for batch in iterator:
            self._batches_yielded += 1
            yield batch

    def _shard(self) -> dict[str, int]:
        sampler: ResumableSampler = self.sampler  # type: ignore[assignment]
        return {
            "seed": sampler.seed,
            "num_samples": sampler.dataset_size,
            "num_replicas": sampler.num_replicas,
            "rank": sampler.rank,
            "batch_size": int(self.batch_size or 1),
        }

    def state_dict(self) -> dict[str, int]:
        """``{"epoch", "batches", "seed", "num_samples", "num_replicas", "rank", "batch_size"}`` (plain ints)."""
        return {"epoch": self.sampler.epoch, "batches": self._batches_yielded, **self._shard()}  # type: ignore[attr-defined]

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Skip ``state_dict["batches"]`` batches in the next iteration if it was saved for this epoch and shard."""
        if int(state_dict.get("epoch", -1)) != self.sampler.epoch:  # type: ignore[attr-defined]
            return
        saved = {k: int(state_dict.get(k, -1)) for k in self._shard()}
        saved["rank"] = self._shard()["rank"]  # the checkpoint is written by rank 0; shards differ only by rank
        if saved != self._shard():
            rank_zero_warn(
                f"Not resuming the training loader mid-epoch: it was saved for {saved}, this run has {self._shard()}. "
                "The epoch restarts from its first batch."
            )
            return
        self._resume_batches = min(int(state_dict["batches"]), len(self))
        self._batches_yielded = self._resume_batches
