"""Batch order of the training pairs: seeded, keyed by epoch, the same across epoch boundaries and worker counts."""

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from dmdd.data.order import EpochBatches, epoch_order, epoch_seed


@pytest.mark.parametrize(("n", "seed"), [(1, 0), (7, 3), (50, 123456)])
def test_one_process_order_is_the_dataloader_shuffle_of_the_same_seed(n, seed):
    loader = DataLoader(range(n), batch_size=1, shuffle=True, generator=torch.Generator().manual_seed(seed))
    assert epoch_order(n, seed) == [int(i) for i in loader]


def test_each_process_gets_its_distributed_share():
    shares = [epoch_order(10, 5, world=3, rank=r) for r in range(3)]
    assert shares == [list(DistributedSampler(range(10), 3, r, shuffle=True, seed=5)) for r in range(3)]
    together = [i for share in shares for i in share]
    assert len(together) == 12 and set(together) == set(range(10))  # every pair, two repeated as padding


def test_batches_of_an_epoch_cut_its_permutation_and_drop_an_incomplete_tail():
    batches = EpochBatches(10, 4, seed=1, first_epoch=2, epochs=1)
    assert batches.steps_per_epoch == 2 == len(batches) and batches.drop_last
    keys = list(batches)
    assert [len(b) for b in keys] == [4, 4]
    assert all(epoch == 2 and stream == 0 for b in keys for epoch, stream, _ in b)
    assert [i for b in keys for _, _, i in b] == epoch_order(10, epoch_seed(1, 2, 0))[:8]
    small = EpochBatches(3, 4, seed=1, epochs=2)  # a set smaller than a batch: one short batch per epoch, kept
    assert [len(b) for b in small] == [3, 3] and not small.drop_last


def test_an_endless_stream_is_the_epochs_one_after_another():
    endless = iter(EpochBatches(9, 2, seed=4, stream=1, first_epoch=3))
    expected = [b for epoch in (3, 4, 5) for b in EpochBatches(9, 2, seed=4, stream=1, first_epoch=epoch, epochs=1)]
    assert [next(endless) for _ in range(12)] == expected
    assert len({tuple(b[0][:2]) for b in expected}) == 3  # keys carry (epoch, stream)
    with pytest.raises(TypeError, match="steps_per_epoch"):
        len(EpochBatches(9, 2, seed=4))
