"""``ResumableSampler``: seeded per-epoch shuffling, sharded over ranks, able to start mid-epoch."""

from __future__ import annotations

from collections.abc import Iterator

import torch

__all__ = ["ResumableSampler"]


class ResumableSampler(torch.utils.data.Sampler[int]):
    """Seeded per-epoch shuffling, sharded over ranks, able to start mid-epoch (exact resume).

    Iterates over ``indices`` (the anchors: all training images, or all but the held-out ones). The order
    of epoch ``e`` depends only on ``(seed, e)``, so a resumed run skips exactly the batches
    that were already trained on. With ``world_size`` ranks, rank r takes every world_size-th index of
    the shuffled order (the tail that does not fill a global batch is dropped, as ``drop_last``).
    """

    def __init__(
        self, indices: list[int], batch_size: int, seed: int, rank: int = 0, world_size: int = 1
    ) -> None:
        if batch_size % world_size:
            raise ValueError(f"batch size {batch_size} must be divisible by the number of processes {world_size}")
        self.indices = torch.as_tensor(indices, dtype=torch.int64)
        self.n, self.global_batch, self.seed = len(self.indices), batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.local_batch = batch_size // world_size
        self.epoch, self.start_batch = 0, 0

    def batches_per_epoch(self) -> int:
        return self.n // self.global_batch

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = self.indices[torch.randperm(self.n, generator=g)[: self.batches_per_epoch() * self.global_batch]]
        mine = order[self.rank :: self.world_size]
        return iter(mine[self.start_batch * self.local_batch :].tolist())

    def __len__(self) -> int:
        return (self.batches_per_epoch() - self.start_batch) * self.local_batch
