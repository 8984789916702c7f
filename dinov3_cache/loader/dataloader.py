"""The DataLoader over a feature cache.

    from preprocessed_dataloader import create_preprocessed_dataloader
    loader = create_preprocessed_dataloader("/path/to/cache", batch_size=4, shuffle=True)
    for features, gt, mask in loader:   # (B, C, D, H, W), (B, D, H, W), (B, D, H, W) or None
        ...

Batches are read straight into one preallocated batch array per array kind (buffers.py), a
background thread reads the next batches while the training step runs (prefetch.py), also
across epoch boundaries (epochs.py), and `device=` hands over tensors already on the GPU
(copied in the stored dtype, converted there).

Several processes (torch.distributed, or rank= / world_size=) each read a disjoint, equally
long share of every epoch (sampler.py). A run resumes mid-epoch from `state_dict()` (resume.py):

    for epoch in range(start_epoch, epochs):
        loader.set_epoch(epoch)
        for batch in loader:
            ...
            checkpoint["loader"] = loader.state_dict()   # later: loader.load_state_dict(...)
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from dinov3_cache.loader.arguments import (
    LoaderArgumentError,
    bounded_workers,
    check_loader_memory,
    device_argument,
    positive_int,
)
from dinov3_cache.loader.buffers import RawBatch
from dinov3_cache.loader.dataset import PreprocessedDINOv3Dataset
from dinov3_cache.loader.epochs import BatchStream, EpochPass
from dinov3_cache.loader.prefetch import PrefetchIterator
from dinov3_cache.loader.resume import check_state, loader_identity, make_state
from dinov3_cache.loader.sampler import EpochBatchSampler, resolve_ranks
from dinov3_cache.loader.volumes import CacheError

DATASET_OPTIONS = (
    "transform", "return_metadata", "features_dtype", "gt_dtype", "crop_size", "samples_per_volume", "seed",
    "allow_mixed_configurations", "reader", "reuse_memory", "verify_checksums",
)


class _BatchReading(Dataset):
    """What the torch DataLoader indexes: one index is a whole batch."""

    def __init__(self, dataset: PreprocessedDINOv3Dataset, pin_memory: bool, convert_on_host: bool):
        self.dataset, self.pin_memory, self.convert_on_host = dataset, pin_memory, convert_on_host

    def __getitem__(self, items) -> RawBatch:
        return self.dataset.read_batch(items, pin_memory=self.pin_memory, convert_on_host=self.convert_on_host)

    def __len__(self) -> int:
        return len(self.dataset)


def _keep(batch):
    return batch


class _StreamSampler:
    """Every batch from a position on, across epochs (what one BatchStream reads)."""

    def __init__(self, sampler: EpochBatchSampler, epoch: int, batch: int):
        self.sampler, self.epoch, self.batch = sampler, epoch, batch

    def __iter__(self):
        return self.sampler.batches_from(self.epoch, self.batch)

    def __len__(self) -> int:
        return len(self.sampler)


@dataclasses.dataclass
class _BatchFinisher:
    """Pins, moves and converts a read batch; holds no reference to the loader, so a loader
    dropped while its prefetch thread runs is collected (and stops the thread)."""

    dataset: PreprocessedDINOv3Dataset
    pin_batches: bool
    device: torch.device | None

    def __call__(self, raw: RawBatch) -> tuple:
        if self.pin_batches and not raw.gt.is_pinned():
            raw = dataclasses.replace(
                raw, features=None if raw.features is None else raw.features.pin_memory(), gt=raw.gt.pin_memory(),
                mask=None if raw.mask is None else raw.mask.pin_memory(),
            )
        device = self.device if self.device is not None and self.device.type != "cpu" else None
        return self.dataset.finish(raw, device)


class PreprocessedDataLoader(DataLoader):
    """A torch DataLoader whose batches are read whole into preallocated arrays, prefetched
    by a background thread (across epoch boundaries), optionally pinned and moved to `device`.

    rank / world_size: this process's share of every epoch (default: from an initialised
    torch.distributed, else the whole epoch). Each rank reads ceil(samples / world_size)
    samples per epoch, the order padded by repeating its start as DistributedSampler does;
    with drop_last, floor(samples / world_size) samples and only full batches.
    Each pass (`for batch in loader`) delivers epoch `set_epoch(n)` if called, else the epoch
    after the previous pass's; the epoch decides the order and the random crops.
    state_dict() / load_state_dict() save and restore the position within the epoch.
    """

    def __init__(
        self,
        dataset: PreprocessedDINOv3Dataset,
        batch_size: int = 1,
        shuffle: bool = False,
        num_workers: int = 0,
        drop_last: bool = False,
        pin_memory: bool = False,
        device: str | torch.device | None = None,
        prefetch_batches: int = 2,
        multiprocessing_context=None,
        rank: int | None = None,
        world_size: int | None = None,
        **loader_kwargs,
    ):
        if not isinstance(dataset, PreprocessedDINOv3Dataset):
            raise LoaderArgumentError(f"dataset must be a PreprocessedDINOv3Dataset, got {type(dataset).__name__}")
        batch_size = positive_int(batch_size, "batch_size")
        prefetch_batches = positive_int(prefetch_batches, "prefetch_batches", minimum=0)
        num_workers = bounded_workers(positive_int(num_workers, "num_workers", minimum=0))
        self.device = device_argument(device)
        check_loader_memory(dataset, batch_size, num_workers, loader_kwargs.get("prefetch_factor"), prefetch_batches)
        wants_pinned = pin_memory or (self.device is not None and self.device.type == "cuda")
        if pin_memory and not torch.cuda.is_available():
            warnings.warn("pin_memory=True but no CUDA GPU is visible: batches are not pinned", stacklevel=2)
        self.pin_batches = wants_pinned and torch.cuda.is_available()
        self.prefetch_batches = prefetch_batches
        self.source_dataset = dataset
        if num_workers > 0 and multiprocessing_context is None:
            multiprocessing_context = default_worker_context()
        if num_workers > 0 and start_method(multiprocessing_context) == "fork":
            raise CacheError(
                "multiprocessing_context 'fork' cannot be used: TensorStore aborts in fork()ed children of a process "
                "that used it; leave multiprocessing_context unset (forkserver) or pass 'spawn'"
            )
        rank, world_size = resolve_ranks(rank, world_size)
        reading = _BatchReading(
            dataset,
            pin_memory=self.pin_batches and num_workers == 0,
            convert_on_host=self.device is None or self.device.type != "cuda",
        )
        # the options of the torch DataLoader behind each BatchStream
        self._stream_options = dict(
            dataset=reading, batch_size=None, num_workers=num_workers, collate_fn=_keep,
            multiprocessing_context=multiprocessing_context, **loader_kwargs,
        )
        super().__init__(
            sampler=EpochBatchSampler(len(dataset), batch_size, shuffle, drop_last, dataset.seed, rank, world_size),
            **self._stream_options,
        )
        self._finisher = _BatchFinisher(dataset, self.pin_batches, self.device)
        self._carried: BatchStream | None = None  # the stream a finished pass left running
        self._position: tuple[int, int, bool] | None = None  # (epoch, batches delivered, finished) of the last pass
        self._resume: tuple[int, int] | None = None  # (epoch, batches delivered) from load_state_dict

    # ------------------------------------------------------------------ passes

    def __iter__(self) -> EpochPass:
        epoch = self.sampler.epoch
        first = self._resume[1] if self._resume is not None and self._resume[0] == epoch else 0
        self._resume = None
        self.sampler.epoch = epoch + 1  # the next pass's epoch, unless set_epoch says otherwise
        return EpochPass(self, self._stream_at(epoch, first), epoch, first, len(self))

    def _stream_at(self, epoch: int, batch: int) -> BatchStream | None:
        """The carried stream if it is at (epoch, batch) (the predicted next epoch), else a new one."""
        carried, self._carried = self._carried, None
        if carried is not None and carried.is_at(epoch, batch):
            return carried
        if carried is not None:
            carried.close()  # it read ahead for another epoch: its batches are discarded
        if len(self) == 0:
            return None
        source = iter(DataLoader(sampler=_StreamSampler(self.sampler, epoch, batch), **self._stream_options))
        prefetch = PrefetchIterator(source, self._finisher, self.prefetch_batches, self.device)
        return BatchStream(prefetch, epoch, batch, len(self))

    def record_position(self, epoch: int, delivered: int, finished: bool) -> None:
        self._position = (epoch, delivered, finished)

    def carry_stream(self, stream: BatchStream) -> None:
        if self._carried is not None:
            self._carried.close()
        self._carried = stream

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next pass delivers (its order and crops), as DistributedSampler.set_epoch.
        Without calls, each pass delivers the epoch after the previous one."""
        self.sampler.set_epoch(epoch)

    # ------------------------------------------------------------------ resuming

    def state_dict(self) -> dict:
        """Where the run is: the epoch and how many of its batches were delivered (by a pass in
        progress; after a finished pass, the next pass's epoch and 0), plus the seed and what the
        position is valid for (volumes, configuration fingerprint, batch size, world size...)."""
        if self._position is not None and not self._position[2]:
            epoch, delivered = self._position[:2]
        elif self._resume is not None and self._resume[0] == self.sampler.epoch:
            epoch, delivered = self._resume
        else:
            epoch, delivered = self.sampler.epoch, 0
        return make_state(self._identity(), epoch, delivered, self.sampler.seed)

    def load_state_dict(self, state: dict) -> None:
        """Continue from a state_dict(): the next pass delivers the rest of the saved epoch,
        with the saved seed. Refused (CacheError) for another dataset, batch size or world size."""
        epoch, delivered, seed = check_state(state, self._identity(), len(self))
        if self._carried is not None:
            self._carried.close()
            self._carried = None
        self.sampler.seed = self.source_dataset.seed = seed
        self.sampler.set_epoch(epoch)
        self._resume, self._position = (epoch, delivered), None

    def _identity(self) -> dict:
        return loader_identity(self.source_dataset, self.sampler)


def start_method(context) -> str | None:
    if context is None:
        return multiprocessing.get_start_method(allow_none=True) or multiprocessing.get_context().get_start_method()
    return context if isinstance(context, str) else context.get_start_method()


def default_worker_context():
    """TensorStore aborts in fork()ed children of a process that used it: never fork."""
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")


def create_preprocessed_dataloader(
    preprocessed_dir: str | Path,
    batch_size: int = 1,
    shuffle: bool = False,
    num_threads: int = 8,
    num_workers: int = 0,
    volume_indices: Sequence[int] | None = None,
    **kwargs,
) -> PreprocessedDataLoader:
    """A DataLoader of (features (B, C, D, H, W), gt (B, D, H, W), mask (B, D, H, W) or None).

    Dataset options (see PreprocessedDINOv3Dataset) and loader options (pin_memory, device,
    prefetch_batches, drop_last, multiprocessing_context, rank, world_size, and any torch
    DataLoader argument) are passed as keywords. num_workers > 0 starts forkserver/spawn worker processes that
    each open their own stores; num_workers=0 reads with num_threads threads in this process.
    """
    dataset_kwargs = {k: kwargs.pop(k) for k in DATASET_OPTIONS if k in kwargs}
    dataset = PreprocessedDINOv3Dataset(preprocessed_dir, volume_indices, num_threads, **dataset_kwargs)
    return PreprocessedDataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers, **kwargs)
