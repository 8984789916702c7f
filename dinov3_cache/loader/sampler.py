"""Which (epoch, index) pairs each batch of the loader reads."""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler


class EpochBatchSampler(Sampler):
    """Batches of (epoch, index): crops and order depend on (seed, epoch) only, so runs
    are reproducible and every pass over the loader draws new crops."""

    def __init__(self, length: int, batch_size: int, shuffle: bool, drop_last: bool, seed: int):
        self.length, self.batch_size, self.shuffle, self.drop_last, self.seed = length, batch_size, shuffle, drop_last, seed
        self.epoch = 0

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch = self.epoch
        self.epoch += 1
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(self.length, generator=generator).tolist()
        else:
            order = list(range(self.length))
        for start in range(0, self.length, self.batch_size):
            batch = order[start : start + self.batch_size]
            if len(batch) < self.batch_size and self.drop_last:
                return
            yield [(epoch, i) for i in batch]

    def __len__(self) -> int:
        full, rest = divmod(self.length, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)
