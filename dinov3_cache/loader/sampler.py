"""Which (epoch, index) pairs each batch of the loader reads, and which share of them each rank reads."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from dinov3_cache.loader.volumes import CacheError


def resolve_ranks(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """rank and world_size as given, else from an initialised torch.distributed, else (0, 1)."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if world_size is None:
        world_size = torch.distributed.get_world_size() if distributed else 1
    if rank is None:
        rank = torch.distributed.get_rank() if distributed else 0
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise CacheError(f"world_size must be a positive integer, got {world_size!r}")
    if not isinstance(rank, int) or isinstance(rank, bool) or not 0 <= rank < world_size:
        raise CacheError(f"rank must be an integer in [0, {world_size - 1}] for world_size {world_size}, got {rank!r}")
    return rank, world_size


class EpochBatchSampler(Sampler):
    """Batches of (epoch, index): order and crops depend on (seed, epoch) only, so runs are
    reproducible, every epoch draws new crops, and every rank computes the same epoch order.

    Ranks split each epoch as torch's DistributedSampler does: the order is padded by repeating
    its start until it divides by world_size (drop_last: its tail is dropped instead), and rank r
    takes every world_size-th sample from position r, so every rank reads as many batches.

    `epoch` is the epoch the next pass delivers; each pass advances it by one, `set_epoch` sets it.
    """

    def __init__(self, length: int, batch_size: int, shuffle: bool, drop_last: bool, seed: int,
                 rank: int = 0, world_size: int = 1):
        self.length, self.batch_size, self.shuffle, self.drop_last, self.seed = length, batch_size, shuffle, drop_last, seed
        self.rank, self.world_size = rank, world_size
        if drop_last and length < world_size:
            raise CacheError(
                f"drop_last with {length} samples leaves nothing for each of {world_size} ranks; "
                "use drop_last=False (samples are repeated) or more samples_per_volume"
            )
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
            raise CacheError(f"epoch must be a non-negative integer, got {epoch!r}")
        self.epoch = epoch

    @property
    def samples_per_rank(self) -> int:
        if self.drop_last:
            return self.length // self.world_size
        return math.ceil(self.length / self.world_size)

    def rank_indices(self, epoch: int) -> list[int]:
        """This rank's dataset indices of `epoch`, in reading order."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(self.length, generator=generator).tolist()
        else:
            order = list(range(self.length))
        total = self.samples_per_rank * self.world_size
        if total > len(order):  # pad with the start of the order (repeated if it is shorter than the padding)
            order = (order * math.ceil(total / len(order)))[:total]
        return order[:total][self.rank :: self.world_size]

    def epoch_batches(self, epoch: int, first_batch: int = 0) -> Iterator[list[tuple[int, int]]]:
        """The batches of `epoch` from batch number `first_batch` on."""
        indices = self.rank_indices(epoch)
        for number in range(first_batch, len(self)):
            start = number * self.batch_size
            yield [(epoch, i) for i in indices[start : start + self.batch_size]]

    def batches_from(self, epoch: int, first_batch: int = 0) -> Iterator[list[tuple[int, int]]]:
        """Every batch from (epoch, first_batch) on, through all later epochs (never ends unless epochs are empty)."""
        if len(self) == 0:
            return
        while True:
            yield from self.epoch_batches(epoch, first_batch)
            epoch, first_batch = epoch + 1, 0

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch = self.epoch
        self.epoch += 1
        return self.epoch_batches(epoch)

    def __len__(self) -> int:
        full, rest = divmod(self.samples_per_rank, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)
