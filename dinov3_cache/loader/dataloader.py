"""PyTorch Dataset / DataLoader over a DINOv3 feature cache.

    from preprocessed_dataloader import create_preprocessed_dataloader
    loader = create_preprocessed_dataloader("/path/to/cache", batch_size=4, shuffle=True)
    for features, gt, mask in loader:   # (B, C, D, H, W), (B, D, H, W), (B, D, H, W) or None
        ...

Batches are read straight into one preallocated batch array per array kind (no per-item
arrays, no collate copy), a background thread reads the next batches while the training
step runs, and `device=` hands over tensors already on the GPU (copied in the stored dtype,
converted there). Reading itself (which volumes are visible, fast chunk reads, errors that
name the volume) lives in reader.py.
"""

from __future__ import annotations

import multiprocessing
import queue
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from dinov3_cache.loader.reader import (
    READER_CHOICES,
    CacheError,
    CachedVolume,
    ReadResources,
    VolumeReadError,
    find_volumes,
    torch_dtype,
)




# ----------------------------------------------------------------------------- samples and batches


@dataclass(frozen=True)
class Sample:
    """What one dataset index means: a volume and a region of it."""

    volume: CachedVolume
    offset: tuple[int, int, int]
    shape: tuple[int, int, int]
    epoch: int

    @property
    def spatial(self) -> tuple[slice, ...]:
        return tuple(slice(o, o + s) for o, s in zip(self.offset, self.shape))

    def describe(self) -> dict:
        return {"offset": list(self.offset), "shape": list(self.shape), "epoch": self.epoch, "has_mask": self.volume.has_mask}


@dataclass
class RawBatch:
    """A batch as read: features in their stored dtype; converted and moved by `finish`."""

    features: torch.Tensor  # (B, C, D, H, W)
    gt: torch.Tensor  # (B, D, H, W)
    mask: torch.Tensor | None  # (B, D, H, W) bool, True where labels are valid; None when no item has a mask
    metadata: list[dict] | None
    has_mask: list[bool] = field(default_factory=list)


class PreprocessedDINOv3Dataset(Dataset):
    """Committed volumes of a cache (or random crops of them) as torch tensors.

    dataset[i] -> (features (C, D, H, W), gt (D, H, W), mask (D, H, W) bool or None[, metadata])

    Args:
        preprocessed_dir: the cache directory (preprocess_volume.py --output-dir).
        volume_indices: volumes to use (default: every committed volume). Volumes without a
            metadata file are never visible; asking for one is an error.
        num_threads: read threads of this process (TensorStore I/O and copies, chunk reads).
        transform: callable(features, gt, mask) -> (features, gt, mask), applied per item.
        return_metadata: also return the volume's metadata dict, with a "sample" entry
            (crop offset and shape, epoch, has_mask).
        features_dtype: torch dtype of the features (default float32); None keeps the stored
            dtype (float16 by default), which halves host memory traffic.
        gt_dtype: torch dtype of the labels (default int64, what cross-entropy takes).
        crop_size: (d, h, w) to return random crops instead of whole volumes; only the chunks
            under the crop are read.
        samples_per_volume: crops per volume per epoch (dataset length = volumes x this).
        seed: crops (and the loader's shuffling) are a function of (seed, epoch, index);
            None draws a seed.
        allow_mixed_configurations: accept volumes whose configuration fingerprints differ.
        reader: "auto" (uncompressed zarr v2 chunks are read directly, the rest through
            TensorStore) or "tensorstore" (everything through TensorStore).
        reuse_memory: read into batch memory of earlier batches that nothing references any
            more (no tensor, view or numpy array on it), instead of fresh memory whose first
            touch costs page faults; False always allocates.
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
    ):
        self.preprocessed_dir = Path(preprocessed_dir)
        self.volumes = find_volumes(self.preprocessed_dir, volume_indices, allow_mixed_configurations)
        self.num_threads = int(num_threads)
        self.transform = transform
        self.return_metadata = return_metadata
        self.features_dtype = features_dtype
        self.gt_dtype = gt_dtype
        self.crop_size = check_crop_size(crop_size, self.volumes)
        if int(samples_per_volume) < 1:
            raise CacheError(f"samples_per_volume must be at least 1, got {samples_per_volume}")
        self.samples_per_volume = int(samples_per_volume)
        self.seed = int(np.random.SeedSequence().entropy % 2**31) if seed is None else int(seed)
        if self.seed < 0:
            raise CacheError(f"seed must be >= 0 (or None), got {seed}")
        if reader not in READER_CHOICES:
            raise CacheError(f"reader must be one of {', '.join(READER_CHOICES)}, got {reader!r}")
        if self.num_threads <= 0:
            raise CacheError(f"num_threads must be positive, got {num_threads}")
        self.reader = reader
        self.reuse_memory = reuse_memory
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
        batch = self.finish(self.read_batch([index]))
        features, gt, mask = batch[0][0], batch[1][0], batch[2]
        has_mask = self.volumes[self._volume_position(index)].has_mask
        item = (features, gt, mask[0] if has_mask and mask is not None else None)
        return item + ((batch[3][0],) if self.return_metadata else ())

    @property
    def resources(self) -> ReadResources:
        with self._resources_lock:
            if self._resources is None:
                self._resources = ReadResources(self.num_threads, self.reader)
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
        offset = tuple(int(rng.integers(0, s - c + 1)) for s, c in zip(shape, self.crop_size))
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
        """With a transform: read, convert, transform each item, then collate."""
        items = []
        for s in samples:
            one = read_samples([s], self.resources, FreshBuffers, False, self.return_metadata, None, None)
            features, gt, mask = self.finish(one)[:3]
            result = self.transform(features[0], gt[0], mask[0] if s.volume.has_mask else None)
            items.append(tuple(result) + ((one.metadata[0],) if self.return_metadata else ()))
        features, gt, mask, *meta = collate_samples(items)
        return RawBatch(features, gt, mask, meta[0] if meta else None, [m is not None for m in (i[2] for i in items)])

    def finish(self, raw: RawBatch, device: torch.device | None = None) -> tuple:
        """Move to `device` in the stored dtype (if given), then convert the dtypes there."""
        features, gt, mask = raw.features, raw.gt, raw.mask
        if device is not None:
            non_blocking = features.is_pinned()
            features = features.to(device, non_blocking=non_blocking)
            gt = gt.to(device, non_blocking=non_blocking)
            mask = None if mask is None else mask.to(device, non_blocking=non_blocking)
        if self.features_dtype is not None:
            features = features.to(self.features_dtype)
        if self.gt_dtype is not None:
            gt = gt.to(self.gt_dtype)
        batch = (features, gt, mask)
        return batch + ((raw.metadata,) if self.return_metadata else ())


def check_crop_size(crop_size, volumes: Sequence[CachedVolume]) -> tuple[int, int, int] | None:
    if crop_size is None:
        return None
    crop = tuple(int(c) for c in crop_size)
    if len(crop) != 3 or min(crop) <= 0:
        raise CacheError(f"crop_size needs 3 positive integers (d, h, w), got {list(crop_size)}")
    for volume in volumes:
        if any(c > s for c, s in zip(crop, volume.spatial_shape)):
            raise CacheError(
                f"crop_size {list(crop)} does not fit volume {volume.index} of spatial shape {list(volume.spatial_shape)}; "
                "choose a smaller crop_size or leave that volume out"
            )
    return crop


def empty_tensor(shape: Sequence[int], dtype: torch.dtype, pin_memory: bool) -> torch.Tensor:
    return torch.empty(tuple(shape), dtype=dtype, pin_memory=pin_memory and torch.cuda.is_available())


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
    features = buffers.empty((n, *feature_shape), features_dtype or common_dtype(samples, "features"), pin_memory)
    gt = buffers.empty((n, *feature_shape[1:]), gt_dtype or common_dtype(samples, "gt"), pin_memory)
    has_mask = [s.volume.has_mask for s in samples]
    mask = buffers.empty((n, *feature_shape[1:]), torch.bool, pin_memory) if any(has_mask) else None

    started: list[tuple[Any, list]] = []
    try:
        for b, s in enumerate(samples):
            reader = resources.reader(s.volume)
            outputs = {"features": features[b], "gt": gt[b]}
            if s.volume.has_mask:
                outputs["mask"] = mask[b]
            elif mask is not None:
                mask[b].fill_(True)  # no mask written: every label voxel of this volume is valid
            started.append((reader, reader.start_read(s.spatial, outputs)))
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
    metadata = [dict(s.volume.metadata, sample=s.describe()) for s in samples] if with_metadata else None
    return RawBatch(features, gt, mask, metadata, has_mask)


def common_dtype(samples: list[Sample], array: str) -> torch.dtype:
    names = {s.volume.metadata["dtypes"][array] for s in samples}
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


# ----------------------------------------------------------------------------- the loader


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
            raw = RawBatch(raw.features.pin_memory(), raw.gt.pin_memory(),
                           None if raw.mask is None else raw.mask.pin_memory(), raw.metadata, raw.has_mask)
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


_END = object()


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


class _BatchProducer:
    """What the prefetch thread runs. It holds no reference to the iterator, so an iterator
    dropped in the middle of an epoch is collected, and its __del__ stops the thread."""

    def __init__(self, source: Iterator, finish: Callable, depth: int, device: torch.device | None):
        self.source, self.finish = source, finish
        self.queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self.stop = threading.Event()
        self.cuda = device is not None and device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None

    def produce(self):
        try:
            raw = next(self.source)
        except StopIteration:
            return _END
        if not self.cuda:
            return self.finish(raw), None
        with torch.cuda.stream(self.stream):
            batch = self.finish(raw)
            ready = torch.cuda.Event()
            ready.record(self.stream)
        ready.synchronize()  # on this background thread: a queued batch is entirely on the GPU
        return batch, ready

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                item = self.produce()
                self.put(item)
                if item is _END:
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            self.put(_Failure(e))

    def put(self, item) -> None:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue


class PrefetchIterator:
    """Runs the batch source on a background thread, `depth` batches ahead. On CUDA the
    host-to-device copies run on their own stream and the consumer's stream waits for them."""

    def __init__(self, source: Iterator, finish: Callable, depth: int, device: torch.device | None):
        self.producer = _BatchProducer(source, finish, depth, device)
        self.device, self.depth = device, depth
        self.wait_seconds = 0.0
        self.thread = threading.Thread(target=self.producer.run, name="batch-prefetch", daemon=True)
        if depth > 0:
            self.thread.start()

    def __iter__(self):
        return self

    def __next__(self):
        started = time.perf_counter()
        item = self.producer.produce() if self.depth == 0 else self.producer.queue.get()
        self.wait_seconds += time.perf_counter() - started
        if item is _END:
            self.close()
            raise StopIteration
        if isinstance(item, _Failure):
            self.close()
            raise item.error
        batch, ready = item
        if ready is not None:
            consumer = torch.cuda.current_stream(self.device)
            consumer.wait_event(ready)
            for t in batch[:3]:
                if t is not None:
                    t.record_stream(consumer)
        return batch

    def __len__(self) -> int:
        return len(self.producer.source)

    def close(self) -> None:
        self.producer.stop.set()
        if self.thread.is_alive() and self.thread is not threading.current_thread():
            while self.thread.is_alive():
                try:
                    self.producer.queue.get(timeout=0.05)
                except queue.Empty:
                    pass
            self.thread.join()
        shutdown = getattr(self.producer.source, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


DATASET_OPTIONS = (
    "transform", "return_metadata", "features_dtype", "gt_dtype", "crop_size", "samples_per_volume", "seed",
    "allow_mixed_configurations", "reader", "reuse_memory",
)


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


