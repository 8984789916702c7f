"""Passes over the loader fed by one prefetching stream of batches that runs across epoch
boundaries: the next epoch's order follows from the seed, so its first batches are read while
the current epoch's last ones are trained on, and a pass that ends hands the stream on to the next."""

from __future__ import annotations

from typing import Protocol

from dinov3_cache.loader.prefetch import PrefetchIterator


def next_position(epoch: int, batch: int, batches_per_epoch: int) -> tuple[int, int]:
    """(epoch, batch) of the batch that follows, after an epoch's last batch the next epoch's first."""
    return (epoch + 1, 0) if batch >= batches_per_epoch else (epoch, batch)


class BatchStream:
    """Batches from a position on, through every later epoch, read ahead by a PrefetchIterator.
    (epoch, batch) is the position of the batch it delivers next."""

    def __init__(self, prefetch: PrefetchIterator, epoch: int, batch: int, batches_per_epoch: int):
        self.prefetch, self.batches_per_epoch = prefetch, batches_per_epoch
        self.epoch, self.batch = next_position(epoch, batch, batches_per_epoch)

    def is_at(self, epoch: int, batch: int) -> bool:
        return not self.prefetch.closed and (self.epoch, self.batch) == next_position(epoch, batch, self.batches_per_epoch)

    def __next__(self):
        item = next(self.prefetch)
        self.epoch, self.batch = next_position(self.epoch, self.batch + 1, self.batches_per_epoch)
        return item

    def close(self) -> None:
        self.prefetch.close()


class PassOwner(Protocol):
    def record_position(self, epoch: int, delivered: int, finished: bool) -> None: ...
    def carry_stream(self, stream: BatchStream) -> None: ...


class EpochPass:
    """One `for batch in loader`: the batches of one epoch, from `first_batch` on. Ending the
    epoch hands the stream (already reading the next epoch) back to the loader; a pass left
    early (close(), or dropped) stops its stream."""

    def __init__(self, owner: PassOwner, stream: BatchStream | None, epoch: int, first_batch: int, batches_per_epoch: int):
        self.owner, self.stream = owner, stream
        self.epoch, self.delivered, self.batches_per_epoch = epoch, first_batch, batches_per_epoch
        self.length = max(batches_per_epoch - first_batch, 0)
        self.thread = None if stream is None else stream.prefetch.thread
        owner.record_position(epoch, first_batch, False)

    def __iter__(self):
        return self

    def __next__(self):
        if self.delivered >= self.batches_per_epoch:
            stream, self.stream = self.stream, None
            self.owner.record_position(self.epoch, self.delivered, True)
            if stream is not None:
                self.owner.carry_stream(stream)
            raise StopIteration
        if self.stream is None:  # closed
            raise StopIteration
        try:
            batch = next(self.stream)
        except BaseException:
            self.close()
            raise
        self.delivered += 1
        self.owner.record_position(self.epoch, self.delivered, False)
        return batch

    def __len__(self) -> int:
        return self.length

    def close(self) -> None:
        stream, self.stream = self.stream, None
        if stream is not None:
            stream.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
