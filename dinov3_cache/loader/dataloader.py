"""The DataLoader over a feature cache.

    from preprocessed_dataloader import create_preprocessed_dataloader
    loader = create_preprocessed_dataloader("/path/to/cache", batch_size=4, shuffle=True)
    for features, gt, mask in loader:   # (B, C, D, H, W), (B, D, H, W), (B, D, H, W) or None
        ...

Batches are read straight into one preallocated batch array per array kind (buffers.py), a
background thread reads the next batches while the training step runs (prefetch.py), and
`device=` hands over tensors already on the GPU (copied in the stored dtype, converted there).
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import warnings
from pathlib import Path
from typing import Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from dinov3_cache.loader.buffers import RawBatch
from dinov3_cache.loader.dataset import PreprocessedDINOv3Dataset
from dinov3_cache.loader.prefetch import PrefetchIterator
from dinov3_cache.loader.reader import CacheError
from dinov3_cache.loader.sampler import EpochBatchSampler

DATASET_OPTIONS = (
    "transform", "return_metadata", "features_dtype", "gt_dtype", "crop_size", "samples_per_volume", "seed",
    "allow_mixed_configurations", "reader", "reuse_memory",
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


class PreprocessedDataLoader(DataLoader):
    """A torch DataLoader whose batches are read whole into preallocated arrays, prefetched
    by a background thread, optionally pinned and moved to `device`."""

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
        **loader_kwargs,
    ):
        if batch_size < 1:
            raise CacheError(f"batch_size must be at least 1, got {batch_size}")
        if prefetch_batches < 0:
            raise CacheError(f"prefetch_batches must be >= 0, got {prefetch_batches}")
        self.device = None if device is None else torch.device(device)
        if self.device is not None and self.device.type == "cuda" and not torch.cuda.is_available():
            raise CacheError(f"device={device} asked for, but no CUDA GPU is visible; use device=None or 'cpu'")
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
        super().__init__(
            _BatchReading(
                dataset,
                pin_memory=self.pin_batches and num_workers == 0,
                convert_on_host=self.device is None or self.device.type != "cuda",
            ),
            batch_size=None,
            sampler=EpochBatchSampler(len(dataset), batch_size, shuffle, drop_last, dataset.seed),
            num_workers=num_workers,
            collate_fn=_keep,
            multiprocessing_context=multiprocessing_context,
            **loader_kwargs,
        )

    def __iter__(self):
        return PrefetchIterator(super().__iter__(), self._finish, self.prefetch_batches, self.device)

    def _finish(self, raw: RawBatch) -> tuple:
        if self.pin_batches and not raw.features.is_pinned():
            raw = dataclasses.replace(
                raw, features=raw.features.pin_memory(), gt=raw.gt.pin_memory(),
                mask=None if raw.mask is None else raw.mask.pin_memory(),
            )
        device = self.device if self.device is not None and self.device.type != "cpu" else None
        return self.source_dataset.finish(raw, device)


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
    prefetch_batches, drop_last, multiprocessing_context, and any torch DataLoader argument)
    are passed as keywords. num_workers > 0 starts forkserver/spawn worker processes that
    each open their own stores; num_workers=0 reads with num_threads threads in this process.
    """
    dataset_kwargs = {k: kwargs.pop(k) for k in DATASET_OPTIONS if k in kwargs}
    dataset = PreprocessedDINOv3Dataset(preprocessed_dir, volume_indices, num_threads, **dataset_kwargs)
    return PreprocessedDataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers, **kwargs)
