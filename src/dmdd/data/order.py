"""Which training pairs go into which batch: a pure function of ``(seed, epoch, stream)``.

Batches carry keys ``(epoch, stream, index)`` rather than bare indices, so a :class:`~dmdd.data.PairDataset` in a
DataLoader worker draws the right pair without being told the epoch. That lets one DataLoader run across epoch
boundaries (:class:`EpochBatches` with no end): its workers build the next epoch's batches while the current one
trains, which keeps a GPU fed on small sets of a few batches per epoch. A resumed run, and any number of workers,
see the same batches as an uninterrupted single-process run.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator

import torch
from torch.utils.data import DistributedSampler, Sampler

PairKey = tuple[int, int, int]  # (epoch, stream, index)


def epoch_seed(seed: int, epoch: int, stream: int) -> int:
    """The seed of one epoch's order; ``stream`` > 0 orders fresh pairs (the segmentation phase)."""
    return seed * 1_000_003 + epoch * 1009 + stream


def epoch_order(n: int, seed: int, world: int = 1, rank: int = 0) -> list[int]:
    """This process's share of one seeded permutation of ``range(n)``.

    One process: the order ``DataLoader(shuffle=True, generator=torch.Generator().manual_seed(seed))`` gives, so runs
    written before batches carried keys train on the same batches. Several: ``DistributedSampler``'s share.
    """
    if world > 1:
        return list(DistributedSampler(range(n), world, rank, shuffle=True, seed=seed))
    gen = torch.Generator().manual_seed(seed)
    torch.empty((), dtype=torch.int64).random_(generator=gen)  # the DataLoader's draw of its workers' base seed
    return torch.randperm(n, generator=gen).tolist()


class EpochBatches(Sampler[list[PairKey]]):
    """Batches of pair keys for epochs ``first_epoch, first_epoch + 1, ...``: ``epochs`` of them, or without end.

    Each epoch is one seeded permutation cut into batches of ``batch_size``; its incomplete last batch is dropped
    when the set holds more than one batch (so every step sees a full batch), kept otherwise.
    """

    def __init__(self, n: int, batch_size: int, seed: int, stream: int = 0, first_epoch: int = 0,
                 epochs: int | None = None, world: int = 1, rank: int = 0) -> None:  # fmt: skip
        self.n, self.batch_size, self.seed, self.stream = n, batch_size, seed, stream
        self.first_epoch, self.epochs, self.world, self.rank = first_epoch, epochs, world, rank
        self.drop_last = n > batch_size
        share = math.ceil(n / world)
        self.steps_per_epoch = share // batch_size if self.drop_last else math.ceil(share / batch_size)

    def epoch(self, epoch: int) -> list[list[PairKey]]:
        """The batches of one epoch."""
        order = epoch_order(self.n, epoch_seed(self.seed, epoch, self.stream), self.world, self.rank)
        keys = [(epoch, self.stream, i) for i in order]
        return [keys[k * self.batch_size : (k + 1) * self.batch_size] for k in range(self.steps_per_epoch)]

    def __iter__(self) -> Iterator[list[PairKey]]:
        start = self.first_epoch
        epochs = itertools.count(start) if self.epochs is None else range(start, start + self.epochs)
        for epoch in epochs:
            yield from self.epoch(epoch)

    def __len__(self) -> int:
        if self.epochs is None:
            raise TypeError("an endless EpochBatches has no length; use steps_per_epoch")
        return self.steps_per_epoch * self.epochs
