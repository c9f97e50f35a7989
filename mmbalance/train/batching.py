"""Deterministic, resumable, rank-aware batching.

Each epoch's order is a function of ``(seed, epoch)`` alone, so a resumed run sees exactly the
batches an uninterrupted run would, with no sampler state to save. Under DDP, global batch ``k``
is split into contiguous, equal per-rank chunks, so ``W`` processes with batch ``B / W`` each
compute the same gradient mean as one process with batch ``B``.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from mmbalance.data.base import collate_batches
from mmbalance.errors import ConfigError


class EpochBatchSampler(Sampler[list[int]]):
    """Training batches: shuffled per epoch from ``(seed, epoch)``, sharded over ranks.

    ``indices`` (default ``0..n-1``) are the dataset indices to draw from, for a trainer that
    holds part of the training split out.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        indices: torch.Tensor | None = None,
    ) -> None:
        if batch_size % world_size:
            raise ConfigError(
                f"train.batch_size={batch_size} must be divisible by the {world_size} processes"
            )
        if indices is not None and len(indices) != n:
            raise ValueError(f"{len(indices)} indices for a sampler of {n} samples")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.indices = indices
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _global_batches(self) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        indices = torch.arange(self.n) if self.indices is None else self.indices
        return shuffled_batches(indices, self.batch_size, self.world_size, gen)

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self._global_batches():
            chunk = len(batch) // self.world_size
            yield batch[self.rank * chunk : (self.rank + 1) * chunk].tolist()

    def __len__(self) -> int:
        return len(self._global_batches())


def shuffled_batches(
    indices: torch.Tensor, batch_size: int, world_size: int, gen: torch.Generator
) -> list[torch.Tensor]:
    """``indices`` in an order drawn from ``gen``, cut into global batches of ``batch_size``; a
    remainder that cannot be split evenly over the ranks (or a single sample) is dropped."""
    if len(indices) == 0:
        return []
    batches = list(indices[torch.randperm(len(indices), generator=gen)].split(batch_size))
    last = batches[-1]
    if len(last) < 2 or len(last) % world_size:
        batches.pop()
    return batches


class SubsetBatchSampler(Sampler[list[int]]):
    """Training batches of a re-sampled epoch (``Method.epoch_subsets``): every subset in turn,
    each shuffled from ``(seed, epoch, its position)`` and cut into batches like
    :class:`EpochBatchSampler`, sharded over ranks the same way. :attr:`names` gives the subset
    of every batch, in order."""

    def __init__(
        self,
        subsets: list[tuple[str, torch.Tensor]],
        batch_size: int,
        seed: int,
        epoch: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size % world_size:
            raise ConfigError(
                f"train.batch_size={batch_size} must be divisible by the {world_size} processes"
            )
        self.rank, self.world_size = rank, world_size
        self.batches: list[torch.Tensor] = []
        self.names: list[str] = []
        for position, (name, index) in enumerate(subsets):
            gen = torch.Generator().manual_seed((seed * 100_003 + epoch) * 1_009 + position)
            chunk = shuffled_batches(index, batch_size, world_size, gen)
            self.batches += chunk
            self.names += [name] * len(chunk)

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batches:
            chunk = len(batch) // self.world_size
            yield batch[self.rank * chunk : (self.rank + 1) * chunk].tolist()

    def __len__(self) -> int:
        return len(self.batches)


class ShardBatchSampler(Sampler[list[int]]):
    """Evaluation batches: every sample exactly once over all ranks, in dataset order
    (of ``indices``, default ``0..n-1``)."""

    def __init__(
        self,
        n: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        indices: torch.Tensor | None = None,
    ) -> None:
        chosen = torch.arange(n) if indices is None else indices
        self.indices = chosen[rank::world_size]
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[list[int]]:
        for chunk in self.indices.split(self.batch_size):
            yield chunk.tolist()

    def __len__(self) -> int:
        return (len(self.indices) + self.batch_size - 1) // self.batch_size


def make_loader(dataset: Dataset, sampler: Sampler[list[int]], num_workers: int) -> DataLoader:
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate_batches,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
    )
