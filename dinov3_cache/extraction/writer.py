"""Writing a volume's arrays: host buffers for feature blocks, the asynchronous TensorStore
writer (with chunk checksums), and the staged arrays under the volume's staging directory."""

from __future__ import annotations

import collections
import concurrent.futures
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import tensorstore as ts
import torch

from dinov3_cache.extraction.config import ExtractionConfig
from dinov3_cache.extraction.features import BLOCK_BYTES
from dinov3_cache.extraction.metadata import FeatureStatistics
from dinov3_cache.sources.base import SourceCrop
from dinov3_cache.zarr_arrays import (
    DEFAULT_LABEL_CHUNKS,
    DEFAULT_RAW_CHUNKS,
    block_checksums,
    clamp_chunks,
    create_array,
    feature_chunks,
)

COMPUTE_CHANNELS = 64  # channels upsampled at once: bounds the float32 temporaries


class BlockBuffers:
    """Reusable host buffers for feature blocks, pinned when a GPU computes them: no page
    faults on fresh memory per block, and fast device-to-host copies."""

    def __init__(self, dtype: str, pinned: bool):
        self.dtype = getattr(torch, dtype)
        self.pinned = pinned
        self.free: dict[tuple[int, ...], list[torch.Tensor]] = collections.defaultdict(list)

    def take(self, shape: tuple[int, ...]) -> torch.Tensor:
        if self.free[shape]:
            return self.free[shape].pop()
        return torch.empty(shape, dtype=self.dtype, pin_memory=self.pinned)

    def give_back(self, buffer: torch.Tensor) -> None:
        self.free[tuple(buffer.shape)].append(buffer)


def assemble_block(
    shape: tuple[int, ...],
    compute_channels: Callable[[int, int], torch.Tensor],
    buffers: BlockBuffers,
    stats: FeatureStatistics,
) -> torch.Tensor:
    """One write unit of features in the stored dtype, computed COMPUTE_CHANNELS at a time."""
    block = buffers.take(shape)
    for lo in range(0, shape[0], COMPUTE_CHANNELS):
        hi = min(shape[0], lo + COMPUTE_CHANNELS)
        values = compute_channels(lo, hi)
        stats.add(values)
        block[lo:hi].copy_(values.to(block.dtype), non_blocking=buffers.pinned)
    if buffers.pinned:
        torch.cuda.current_stream().synchronize()
    return block


def to_numpy(block: torch.Tensor, dtype: str) -> np.ndarray:
    """A view of a host tensor already in the stored dtype (numpy has no bfloat16: ml_dtypes)."""
    if dtype == "bfloat16":
        import ml_dtypes

        return block.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return block.numpy()


class AsyncBlockWriter:
    """Writes blocks through TensorStore while computing goes on, with at most
    `max_in_flight_bytes` outstanding (the disk needs several writes at once; memory bounds
    them); crc32s of every chunk are taken on a thread."""

    def __init__(self, max_in_flight_bytes: int = 4 * BLOCK_BYTES):
        self.max_in_flight_bytes = max_in_flight_bytes
        self.in_flight_bytes = 0
        self.pending: collections.deque = collections.deque()
        self.checksums: dict[str, dict[str, int]] = collections.defaultdict(dict)
        self.hasher = concurrent.futures.ThreadPoolExecutor(max_workers=2)
        self.wait_seconds = 0.0

    def write(
        self, name: str, store: ts.TensorStore, origin: tuple[int, ...], block: np.ndarray, chunks,
        release: Callable[[], None] = lambda: None,
    ) -> None:
        """Start writing `block` at `origin`; `release` runs once the block is no longer read."""
        region = tuple(slice(o, o + n) for o, n in zip(origin, block.shape))
        future = store[region].write(block)
        checksum = self.hasher.submit(block_checksums, block, origin, chunks)
        self.pending.append((name, future, checksum, release, block.nbytes))
        self.in_flight_bytes += block.nbytes
        while self.in_flight_bytes > self.max_in_flight_bytes and len(self.pending) > 1:
            self._finish_oldest()

    def _finish_oldest(self) -> None:
        name, future, checksum, release, nbytes = self.pending.popleft()
        self.in_flight_bytes -= nbytes
        started = time.perf_counter()
        future.result()
        self.checksums[name].update(checksum.result())
        self.wait_seconds += time.perf_counter() - started
        release()

    def flush(self) -> None:
        while self.pending:
            self._finish_oldest()
        self.hasher.shutdown()

    def abandon(self) -> None:
        for _, future, *_ in self.pending:
            try:
                future.result()
            except Exception:
                pass
        self.pending.clear()
        self.hasher.shutdown(cancel_futures=True)


@dataclass
class StagedArrays:
    stores: dict[str, ts.TensorStore]
    chunks: dict[str, tuple[int, ...]]


def stage_arrays(config: ExtractionConfig, crop: SourceCrop, n_channels: int, commit_id: str, context) -> StagedArrays:
    """Create every array of the volume under the staging directory."""
    d = config.geometry.output_image_dim
    shapes = {"features": (n_channels, d, d, d), "gt": crop.gt.shape}
    dtypes = {"features": config.features_dtype, "gt": crop.gt.dtype.name}
    chunks = {
        "features": feature_chunks(shapes["features"], config.storage.feature_chunks),
        "gt": clamp_chunks(crop.gt.shape, DEFAULT_LABEL_CHUNKS),
    }
    if crop.mask is not None:
        shapes["mask"], dtypes["mask"], chunks["mask"] = crop.mask.shape, "uint8", clamp_chunks(crop.mask.shape, DEFAULT_LABEL_CHUNKS)
    if config.save_raw:
        shapes["raw"], dtypes["raw"], chunks["raw"] = crop.raw.shape, crop.raw.dtype.name, clamp_chunks(crop.raw.shape, DEFAULT_RAW_CHUNKS)
    stores = {}
    for name in shapes:
        grid = crop.raw_grid if name == "raw" else crop.label_grid
        attributes = grid.array_attributes(channel_axis=name == "features")
        attributes["dinov3_cache"] = {"commit_id": commit_id, "volume_index": config.volume_index, "array": name}
        dims = (["c"] if name == "features" else []) + ["z", "y", "x"]
        stores[name] = create_array(
            config.paths.staged_array(name), shapes[name], dtypes[name], chunks[name], config.storage, context, attributes, dims
        )
    return StagedArrays(stores, chunks)


def write_label_arrays(crop: SourceCrop, staged: StagedArrays, writer: AsyncBlockWriter) -> None:
    arrays = {"gt": crop.gt, "mask": crop.mask, "raw": crop.raw}
    for name, store in staged.stores.items():
        if name != "features":
            writer.write(name, store, (0,) * arrays[name].ndim, np.ascontiguousarray(arrays[name]), staged.chunks[name])
