"""The torch Dataset over a feature cache: what each index means (a volume, or a random crop
of one) and reading batches of indices. Reading itself (which volumes are visible, fast chunk
reads, errors that name the volume) lives in reader.py; batch memory in buffers.py."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from dinov3_cache.loader.arguments import (
    bounded_threads,
    cache_directory,
    crop_shape,
    dtype_argument,
    positive_int,
    sample_index,
    volume_index_list,
)
from dinov3_cache.loader.buffers import BatchBuffers, FreshBuffers, RawBatch, SharedBuffers, collate_samples, read_samples
from dinov3_cache.loader.reader import READER_CHOICES, ReadResources
from dinov3_cache.loader.tokens import fill_token_features
from dinov3_cache.loader.volumes import CachedVolume, CacheError, find_volumes


@dataclass(frozen=True)
class Sample:
    """What one dataset index means: a volume and a region of it."""

    volume: CachedVolume
    offset: tuple[int, int, int]
    shape: tuple[int, int, int]
    epoch: int

    @property
    def spatial(self) -> tuple[slice, ...]:
        return tuple(slice(o, o + s) for o, s in zip(self.offset, self.shape, strict=False))

    def describe(self) -> dict:
        return {"offset": list(self.offset), "shape": list(self.shape), "epoch": self.epoch, "has_mask": self.volume.has_mask}


class PreprocessedDINOv3Dataset(Dataset):
    """Committed volumes of a cache (or random crops of them) as torch tensors.

    dataset[i] -> (features (C, D, H, W), gt (D, H, W), mask (D, H, W) bool or None[, metadata])

    Args:
        preprocessed_dir: the cache directory (preprocess_volume.py --output-dir).
        volume_indices: volumes to use (default: every committed volume). Volumes without a
            metadata file are never visible; asking for one is an error.
        num_threads: read threads of this process (TensorStore I/O and copies, chunk reads).
        transform: callable(features, gt, mask) -> (features, gt, mask), applied per item to
            tensors in features_dtype / gt_dtype; what it returns reaches training unchanged,
            its dtypes included (e.g. float16 -> float32 features, or int64 labels).
        return_metadata: also return the volume's metadata dict, with a "sample" entry
            (crop offset and shape, epoch, has_mask).
        features_dtype: floating torch dtype of the features, or its name ('float32'; default
            float32); None keeps the stored dtype (float16 by default), which halves host memory traffic.
        gt_dtype: torch dtype of the labels, or its name (default int64, what cross-entropy takes).
        crop_size: (d, h, w), or one integer edge for a cube, to return random crops instead
            of whole volumes; only the chunks under the crop are read.
        samples_per_volume: crops per volume per epoch (dataset length = volumes x this).
        seed: crops (and the loader's shuffling) are a function of (seed, epoch, index);
            None draws a seed.
        allow_mixed_configurations: accept volumes whose configuration fingerprints differ.
        reader: "auto" (uncompressed zarr v2 chunks are read directly, the rest through
            TensorStore) or "tensorstore" (everything through TensorStore).
        reuse_memory: read into batch memory of earlier batches that nothing references any
            more (no tensor, view or numpy array on it), instead of fresh memory whose first
            touch costs page faults; False always allocates.
        verify_checksums: check every chunk read against the crc32 the writer recorded, in the
            read threads (a damaged chunk is an error naming volume, array and chunk); each chunk
            file once per process and file identity, so rereading a file costs nothing. On by
            default; False reads unchecked. Missing written chunks, arrays that disagree with
            their metadata and volumes under another index's names are errors regardless.
    """

    def __init__(
        self,
        preprocessed_dir: str | Path,
        volume_indices: Sequence[int] | None = None,
        num_threads: int = 8,
        transform: Callable | None = None,
        return_metadata: bool = False,
        features_dtype: torch.dtype | None = torch.float32,
        gt_dtype: torch.dtype | None = torch.int64,
        crop_size: Sequence[int] | None = None,
        samples_per_volume: int = 1,
        seed: int | None = 0,
        allow_mixed_configurations: bool = False,
        reader: str = "auto",
        reuse_memory: bool = True,
        verify_checksums: bool = True,
    ):
        self.preprocessed_dir = cache_directory(preprocessed_dir)
        self.num_threads = bounded_threads(positive_int(num_threads, "num_threads"))
        self.features_dtype = dtype_argument(features_dtype, "features_dtype", floating_only=True)
        self.gt_dtype = dtype_argument(gt_dtype, "gt_dtype", floating_only=False)
        crop = crop_shape(crop_size)
        self.samples_per_volume = positive_int(samples_per_volume, "samples_per_volume")
        self.seed = int(np.random.SeedSequence().entropy % 2**31) if seed is None else positive_int(seed, "seed", minimum=0)
        if reader not in READER_CHOICES:
            raise CacheError(f"reader must be one of {', '.join(READER_CHOICES)}, got {reader!r}")
        if transform is not None and not callable(transform):
            raise CacheError(f"transform must be a callable(features, gt, mask) or None, got {transform!r}")
        self.volumes = find_volumes(self.preprocessed_dir, volume_index_list(volume_indices), allow_mixed_configurations)
        self.transform = transform
        self.return_metadata = return_metadata
        self.crop_size = check_crop_size(crop, self.volumes)
        self.reader = reader
        self.reuse_memory = reuse_memory
        self.verify_checksums = bool(verify_checksums)
        self._resources: ReadResources | None = None
        self._resources_lock = threading.Lock()
        self._buffers: BatchBuffers | None = None

    # pickled into spawned workers: without TensorStore objects or threads (each worker opens its own)
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_resources"] = None
        state["_resources_lock"] = None
        state["_buffers"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._resources_lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.volumes) * self.samples_per_volume

    def __getitem__(self, index: int):
        index = sample_index(index)
        batch = self.finish(self.read_batch([index]))
        features, gt, mask = batch[0][0], batch[1][0], batch[2]
        has_mask = self.volumes[self._volume_position(index)].has_mask
        item = (features, gt, mask[0] if has_mask and mask is not None else None)
        return item + ((batch[3][0],) if self.return_metadata else ())

    @property
    def resources(self) -> ReadResources:
        with self._resources_lock:
            if self._resources is None:
                self._resources = ReadResources(self.num_threads, self.reader, self.verify_checksums)
            return self._resources

    # ------------------------------------------------------------------ what each index reads

    def _volume_position(self, index: int) -> int:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} samples")
        return index // self.samples_per_volume

    def sample(self, index: int, epoch: int = 0) -> Sample:
        """The volume and region of dataset index `index` in epoch `epoch` (reproducible)."""
        volume = self.volumes[self._volume_position(index)]
        shape = volume.spatial_shape
        if self.crop_size is None:
            return Sample(volume, (0, 0, 0), tuple(shape), epoch)
        rng = np.random.default_rng([self.seed, epoch, index])
        offset = tuple(int(rng.integers(0, s - c + 1)) for s, c in zip(shape, self.crop_size, strict=False))
        return Sample(volume, offset, self.crop_size, epoch)

    # ------------------------------------------------------------------ reading

    def read_batch(
        self, items: Sequence[int | tuple[int, int]], pin_memory: bool = False, convert_on_host: bool = True
    ) -> RawBatch:
        """Read a batch; items are indices or (epoch, index) pairs. With convert_on_host the
        tensors come in features_dtype / gt_dtype, else in the stored dtypes (for a GPU to convert)."""
        samples = [self.sample(i) if isinstance(i, (int, np.integer)) else self.sample(i[1], i[0]) for i in items]
        if self.transform is not None:
            return self._read_transformed(samples)
        dtypes = (self.features_dtype, self.gt_dtype) if convert_on_host else (None, None)
        return read_samples(samples, self.resources, self.buffers_for(pin_memory), pin_memory, self.return_metadata, *dtypes)

    def buffers_for(self, pin_memory: bool):
        # worker results travel through shared memory; pinned memory is recycled by torch's
        # caching host allocator, which knows when the asynchronous copies from it have finished
        if torch.utils.data.get_worker_info() is not None:
            return SharedBuffers
        if pin_memory or not self.reuse_memory or not hasattr(torch._C, "_storage_Use_Count"):  # the reuse test needs it
            return FreshBuffers
        if self._buffers is None:
            self._buffers = BatchBuffers()
        return self._buffers

    def _read_transformed(self, samples: list[Sample]) -> RawBatch:
        """With a transform: read, convert, transform each item, then collate. The batch
        keeps the transform's dtypes."""
        items = []
        for s in samples:
            one = read_samples([s], self.resources, FreshBuffers, False, self.return_metadata, None, None)
            features, gt, mask = self.finish(one)[:3]
            result = self.transform(features[0], gt[0], mask[0] if s.volume.has_mask else None)
            items.append(tuple(result) + ((one.metadata[0],) if self.return_metadata else ()))
        features, gt, mask, *meta = collate_samples(items)
        has_mask = [i[2] is not None for i in items]
        return RawBatch(features, gt, mask, meta[0] if meta else None, has_mask, final_dtypes=True)

    def finish(self, raw: RawBatch, device: torch.device | None = None) -> tuple:
        """Move to `device` in the stored dtype (if given), then convert the dtypes there
        (unless a transform chose them)."""
        features, gt, mask = raw.features, raw.gt, raw.mask
        if device is not None:
            non_blocking = gt.is_pinned()
            features = None if features is None else features.to(device, non_blocking=non_blocking)
            gt = gt.to(device, non_blocking=non_blocking)
            mask = None if mask is None else mask.to(device, non_blocking=non_blocking)
        if raw.tokens is not None:  # token volumes: features built here, on the batch's device
            features = fill_token_features(features, raw.tokens, device, self.features_dtype)
        elif self.features_dtype is not None and not raw.final_dtypes:
            features = features.to(self.features_dtype)
        if self.gt_dtype is not None and not raw.final_dtypes:
            gt = gt.to(self.gt_dtype)
        batch = (features, gt, mask)
        return batch + ((raw.metadata,) if self.return_metadata else ())


def check_crop_size(crop_size, volumes: Sequence[CachedVolume]) -> tuple[int, int, int] | None:
    if crop_size is None:
        return None
    crop = crop_shape(crop_size)
    for volume in volumes:
        if any(c > s for c, s in zip(crop, volume.spatial_shape, strict=False)):
            raise CacheError(
                f"crop_size {list(crop)} does not fit volume {volume.index} of spatial shape {list(volume.spatial_shape)}; "
                "choose a smaller crop_size or leave that volume out"
            )
    return crop
