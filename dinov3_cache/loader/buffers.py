"""Batch memory and batch assembly: every sample of a batch is read straight into one
preallocated tensor per array kind (no per-item arrays, no collate copy)."""

from __future__ import annotations

import ctypes
import math
import mmap
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from dinov3_cache.loader.reader import ReadResources
from dinov3_cache.loader.volumes import CacheError, VolumeReadError
from dinov3_cache.storage.dtypes import torch_dtype

if TYPE_CHECKING:
    from dinov3_cache.loader.dataset import Sample
    from dinov3_cache.storage.base import BuiltCrop


@dataclass
class RawBatch:
    """A batch as read: features in their stored dtype; converted and moved by the dataset's `finish`."""

    features: torch.Tensor | None  # (B, C, D, H, W)
    gt: torch.Tensor  # (B, D, H, W)
    mask: torch.Tensor | None  # (B, D, H, W) bool, True where labels are valid; None when no item has a mask
    metadata: list[dict] | None
    has_mask: list[bool] = field(default_factory=list)
    final_dtypes: bool = False  # a transform chose the dtypes: `finish` moves the tensors but never casts them
    # items whose storage form builds their features (token volumes): `finish` builds them where
    # the batch goes (features then holds only the items read as stored, or is None when there are none)
    tokens: list[BuiltCrop | None] | None = None


HUGE_PAGE = 2 << 20
HUGE_PAGES_FROM = 8 << 20  # bytes: batch tensors this large are backed by huge pages where the system allows it


def empty_tensor(shape: Sequence[int], dtype: torch.dtype, pin_memory: bool) -> torch.Tensor:
    """A batch tensor. A large one in pageable memory starts on a 2 MiB boundary and asks the
    kernel for transparent huge pages (madvise; nothing changes where they are off): writing a
    batch then misses the TLB 512x less often (C = 256, 64^3 token crops built 7-10 % faster on the
    2-core VM; docs/benchmarks.md, "Layouts: dense or tokens")."""
    shape = tuple(shape)
    nbytes = math.prod(shape) * dtype.itemsize
    if (pin_memory and torch.cuda.is_available()) or nbytes < HUGE_PAGES_FROM or _madvise is None:
        return torch.empty(shape, dtype=dtype, pin_memory=pin_memory and torch.cuda.is_available())
    storage = torch.empty(nbytes + HUGE_PAGE, dtype=torch.uint8).untyped_storage()
    start = -storage.data_ptr() % HUGE_PAGE
    # the advice stays with the memory once the tensor is freed (malloc may hand it out again): harmless
    _madvise(ctypes.c_void_p(storage.data_ptr() + start), ctypes.c_size_t(nbytes // HUGE_PAGE * HUGE_PAGE), mmap.MADV_HUGEPAGE)
    return torch.empty(0, dtype=dtype).set_(storage, start // dtype.itemsize, shape)  # no other tensor holds the storage


def _libc_madvise():
    """libc's madvise, or None where there is none to ask (not Linux)."""
    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_HUGEPAGE"):
        return None
    madvise = ctypes.CDLL(None, use_errno=True).madvise
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return madvise


_madvise = _libc_madvise()


class BatchBuffers:
    """Batch tensors handed out earlier are reused once nothing else references them
    (not the tensor, no view of it, no numpy array on it). A fresh multi-GB tensor costs a
    page fault per 4 KiB on first touch: on the 2-core test VM about as much CPU as the read
    itself (benchmarks/bench_loader_read.py, 'fresh memory' row)."""

    def __init__(self, keep: int = 12):
        self.keep = keep
        self.tensors: list[torch.Tensor] = []
        self.lock = threading.Lock()  # the prefetch thread and the caller may both read

    def empty(self, shape: Sequence[int], dtype: torch.dtype, pin_memory: bool) -> torch.Tensor:
        with self.lock:
            return self._take(tuple(shape), dtype, pin_memory and torch.cuda.is_available())

    def _take(self, shape: tuple[int, ...], dtype: torch.dtype, pinned: bool) -> torch.Tensor:
        for tensor in self.tensors:
            # references to an unused tensor: self.tensors, `tensor`, getrefcount's argument; to its
            # storage: the tensor and the temporary storage object. More means someone still uses it.
            unused = sys.getrefcount(tensor) <= 3 and torch._C._storage_Use_Count(tensor.untyped_storage()._cdata) <= 2
            if unused and tensor.shape == shape and tensor.dtype == dtype and tensor.is_pinned() == pinned:
                return tensor
        tensor = empty_tensor(shape, dtype, pinned)
        self.tensors.append(tensor)
        if len(self.tensors) > self.keep:
            self.tensors.pop(0)  # forgetting a tensor is always safe: whoever holds it keeps it
        return tensor


class FreshBuffers:
    """New memory for every batch: pinned memory (recycled by torch's caching host allocator)
    and the transform path."""

    @staticmethod
    def empty(shape: Sequence[int], dtype: torch.dtype, pin_memory: bool) -> torch.Tensor:
        return empty_tensor(shape, dtype, pin_memory)


class SharedBuffers:
    """In a worker process: batches are read straight into shared memory, which is how torch
    hands them to the main process, so sending them copies nothing (a tensor in private memory
    would be copied into shared memory first)."""

    @staticmethod
    def empty(shape: Sequence[int], dtype: torch.dtype, pin_memory: bool) -> torch.Tensor:
        numel = int(np.prod(shape))
        storage = torch.UntypedStorage._new_shared(max(numel, 1) * dtype.itemsize)
        return torch.empty(0, dtype=dtype).set_(storage, 0, tuple(shape))


def read_samples(
    samples: list[Sample],
    resources: ReadResources,
    buffers,
    pin_memory: bool,
    with_metadata: bool,
    features_dtype: torch.dtype | None,
    gt_dtype: torch.dtype | None,
) -> RawBatch:
    """Read every sample straight into one batch tensor per kind, all reads in flight together.
    Features and gt land in features_dtype / gt_dtype (None: the stored dtype); the cast happens
    in the same copy."""
    shapes = {s.volume.features_shape[:1] + s.shape for s in samples}
    if len(shapes) > 1:
        listed = ", ".join(f"volume {s.volume.index}: {list(s.volume.features_shape[:1] + s.shape)}" for s in samples)
        raise CacheError(
            f"a batch needs equal shapes, got {listed}; pass crop_size, or batch_size=1, or choose volumes with volume_indices"
        )
    n, feature_shape = len(samples), shapes.pop()
    forms = [s.volume.metadata.storage_form for s in samples]
    built = [form.builds_features for form in forms]
    deferred = features_dtype is None  # built features are made by `finish`, where the batch goes
    features = None
    if not (deferred and all(built)):
        features = buffers.empty((n, *feature_shape), features_dtype or common_dtype(samples, "features"), pin_memory)
    built_crops: list[BuiltCrop | None] = [None] * n
    gt = buffers.empty((n, *feature_shape[1:]), gt_dtype or common_dtype(samples, "gt"), pin_memory)
    has_mask = [s.volume.has_mask for s in samples]
    mask = buffers.empty((n, *feature_shape[1:]), torch.bool, pin_memory) if any(has_mask) else None

    def allocate(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:  # what a form reads besides the batch
        return buffers.empty(shape, dtype, pin_memory)

    started: list[tuple[Any, list]] = []
    try:
        for b, s in enumerate(samples):
            reader = resources.reader(s.volume)
            outputs = {"gt": gt[b]}
            built_crops[b], pending = forms[b].start_read(reader, s.spatial, None if built[b] else features[b], allocate)
            if s.volume.has_mask:
                outputs["mask"] = mask[b]
            elif mask is not None:
                mask[b].fill_(True)  # no mask written: every label voxel of this volume is valid
            started.append((reader, pending))
            pending += reader.start_read(s.spatial, outputs)
    finally:
        # every started read is awaited (the buffers must outlive them), then the first failure is raised
        failures = []
        for reader, pending in started:
            try:
                reader.finish(pending)
            except VolumeReadError as e:
                failures.append(e)
        if failures and sys.exc_info()[0] is None:
            raise failures[0]
    if any(built) and not deferred:
        for b, crop in enumerate(built_crops):
            if crop is not None:
                crop.features(out=features[b])
    metadata = [s.volume.metadata_dict | {"sample": s.describe()} for s in samples] if with_metadata else None
    return RawBatch(features, gt, mask, metadata, has_mask, tokens=built_crops if deferred and any(built) else None)


def common_dtype(samples: list[Sample], array: str) -> torch.dtype:
    names = {s.volume.metadata.dtypes[s.volume.metadata.storage_form.array_name if array == "features" else array] for s in samples}
    if len(names) > 1:
        raise CacheError(
            f"a batch mixes {array} stored as {', '.join(sorted(names))} (volumes "
            f"{', '.join(str(s.volume.index) for s in samples)}); pass features_dtype / gt_dtype, or use batch_size=1"
        )
    return torch_dtype(names.pop())


def collate_samples(samples: Sequence[tuple]) -> tuple:
    """Collate items of PreprocessedDINOv3Dataset (for a plain torch DataLoader):
    features and gt are stacked; masks are stacked with all-True for items without one,
    or None when no item has one; metadata dicts stay a list."""
    features = torch.stack([s[0] for s in samples])
    gt = torch.stack([s[1] for s in samples])
    masks = [s[2] for s in samples]
    if all(m is None for m in masks):
        mask = None
    else:
        like = next(m for m in masks if m is not None)
        mask = torch.stack([torch.ones_like(like) if m is None else m for m in masks])
    rest = (list(s[3] for s in samples),) if len(samples[0]) > 3 else ()
    return (features, gt, mask) + rest
