"""Writing a volume's arrays: the staged arrays under the volume's staging directory, the
crop's token grids handed to the storage form that writes the features (dinov3_cache/storage),
host buffers for the blocks, and the asynchronous TensorStore writer (with chunk checksums)."""

from __future__ import annotations

import collections
import concurrent.futures
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import tensorstore as ts
import torch

from dinov3_cache.extraction.config import PLANE_AXES, ExtractionConfig
from dinov3_cache.extraction.features import (
    BLOCK_BYTES,
    SliceProgress,
    dense_token_slabs,
    plane_order,
    plane_token_slabs,
)
from dinov3_cache.extraction.metadata import FeatureStatistics
from dinov3_cache.extraction.model import LoadedModel
from dinov3_cache.sources.base import SourceCrop
from dinov3_cache.storage.dtypes import numpy_view
from dinov3_cache.zarr_arrays import (
    DEFAULT_LABEL_CHUNKS,
    DEFAULT_RAW_CHUNKS,
    block_checksums,
    clamp_chunks,
    create_array,
    write_unit,
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


def stage_arrays(
    config: ExtractionConfig, crop: SourceCrop, n_channels: int, commit_id: str, context, grid_size: int = 0
) -> StagedArrays:
    """Create every array of the volume under the staging directory: the features in the
    run's storage form, and the labels (and raw)."""
    form = config.storage_form
    feature_shape = form.array_shape(n_channels, config.geometry.output_image_dim, config.planes, grid_size)
    shapes = {form.array_name: feature_shape, "gt": crop.gt.shape}
    dtypes = {form.array_name: config.features_dtype, "gt": crop.gt.dtype.name}
    chunks = {form.array_name: form.array_chunks(feature_shape, form.requested_chunks(config.storage)),
              "gt": clamp_chunks(crop.gt.shape, DEFAULT_LABEL_CHUNKS)}
    if crop.mask is not None:
        shapes["mask"], dtypes["mask"], chunks["mask"] = crop.mask.shape, "uint8", clamp_chunks(crop.mask.shape, DEFAULT_LABEL_CHUNKS)
    if config.save_raw:
        shapes["raw"], dtypes["raw"], chunks["raw"] = crop.raw.shape, crop.raw.dtype.name, clamp_chunks(crop.raw.shape, DEFAULT_RAW_CHUNKS)
    stores = {}
    for name in shapes:
        if name == form.array_name:
            attributes, dims = form.array_attributes(crop.label_grid, config.planes), list(form.dimension_names)
        else:
            grid = crop.raw_grid if name == "raw" else crop.label_grid
            attributes, dims = grid.array_attributes(channel_axis=False), ["z", "y", "x"]
        run = {"commit_id": commit_id, "volume_index": config.volume_index, "array": name}
        attributes["dinov3_cache"] = run | attributes.get("dinov3_cache", {})
        stores[name] = create_array(
            config.paths.staged_array(name), shapes[name], dtypes[name], chunks[name], config.storage, context, attributes, dims
        )
    return StagedArrays(stores, chunks)


def write_label_arrays(crop: SourceCrop, staged: StagedArrays, writer: AsyncBlockWriter) -> None:
    arrays = {"gt": crop.gt, "mask": crop.mask, "raw": crop.raw}
    for name, store in staged.stores.items():
        if name in arrays:
            writer.write(name, store, (0,) * arrays[name].ndim, np.ascontiguousarray(arrays[name]), staged.chunks[name])


# ----------------------------------------------------------------------------- features


@dataclass
class FeatureOutput:
    """Where feature blocks go: the staged array, host buffers, the writer and the statistics."""

    name: str
    staged: StagedArrays
    writer: AsyncBlockWriter
    buffers: BlockBuffers
    stats: FeatureStatistics
    dtype: str
    zarr_format: int
    block_bytes: int = BLOCK_BYTES

    @property
    def unit(self) -> tuple[int, ...]:
        """The block a write must fill whole (a chunk in zarr v2, a shard in v3)."""
        store = self.staged.stores[self.name]
        return write_unit(tuple(store.shape), self.staged.chunks[self.name], self.zarr_format)

    def put(self, origin: tuple[int, ...], shape: tuple[int, ...], compute_channels: Callable[[int, int], torch.Tensor]) -> None:
        block = assemble_block(shape, compute_channels, self.buffers, self.stats)
        self.writer.write(self.name, self.staged.stores[self.name], origin, numpy_view(block),
                          self.staged.chunks[self.name], release=lambda: self.buffers.give_back(block))


@dataclass
class CropTokens:
    """The crop's token grids, computed as the storage form asks for them (storage.base.CropTokens)."""

    loaded: LoadedModel
    crop: SourceCrop
    planes: tuple[str, ...]
    out_dim: int
    batch_size: int
    progress: SliceProgress

    @property
    def streaming_axis(self) -> int:
        return PLANE_AXES[plane_order(self.planes)[1]][0]

    def streamed_slabs(self, slab: int):
        return dense_token_slabs(self.loaded, self.crop, self.planes, self.out_dim, self.batch_size, slab, self.progress)

    def plane_slabs(self, slab: int):
        return plane_token_slabs(self.loaded, self.crop, self.planes, self.out_dim, self.batch_size, slab, self.progress)


def write_features(
    loaded: LoadedModel, crop: SourceCrop, config: ExtractionConfig, staged: StagedArrays,
    writer: AsyncBlockWriter, stats: FeatureStatistics, progress: SliceProgress,
) -> None:
    """Run the planes through the model and write the volume's features in its storage form."""
    form = config.storage_form
    buffers = BlockBuffers(config.features_dtype, pinned=loaded.device.type == "cuda")
    output = FeatureOutput(form.array_name, staged, writer, buffers, stats, config.features_dtype, config.storage.zarr_format)
    tokens = CropTokens(loaded, crop, config.planes, config.geometry.output_image_dim, config.batch_size, progress)
    form.write_features(tokens, output)
