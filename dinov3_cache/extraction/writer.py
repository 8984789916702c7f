"""Writing a volume's arrays: the staged arrays under the volume's staging directory, the
features of either layout built from token grids (dense: blocks made by
`features_from_tokens`; tokens: the grids themselves), host buffers for the blocks, and the
asynchronous TensorStore writer (with chunk checksums)."""

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
from dinov3_cache.extraction.upsampling import features_from_tokens
from dinov3_cache.layout import feature_array_name
from dinov3_cache.sources.base import SourceCrop
from dinov3_cache.zarr_arrays import (
    DEFAULT_LABEL_CHUNKS,
    DEFAULT_RAW_CHUNKS,
    block_checksums,
    clamp_chunks,
    create_array,
    feature_chunks,
    write_unit,
)

COMPUTE_CHANNELS = 64  # channels upsampled at once: bounds the float32 temporaries
TOKEN_DIMENSIONS = ["plane", "c", "slice", "a", "b"]


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


def feature_array_spec(config: ExtractionConfig, n_channels: int, grid_size: int) -> tuple[str, tuple[int, ...], tuple[int, ...]]:
    """(array name, shape, chunks) of the volume's feature storage in its layout."""
    d = config.geometry.output_image_dim
    requested = config.storage.chunks_of(config.layout)
    if config.layout == "tokens":
        shape = (len(config.planes), n_channels, d, grid_size, grid_size)
        return "tokens", shape, (1, *feature_chunks(shape[1:], requested))  # one plane per chunk
    shape = config.geometry.feature_shape(n_channels)
    return "features", shape, feature_chunks(shape, requested)


def stage_arrays(
    config: ExtractionConfig, crop: SourceCrop, n_channels: int, commit_id: str, context, grid_size: int = 0
) -> StagedArrays:
    """Create every array of the volume under the staging directory."""
    feature_name, feature_shape, chunks_of_features = feature_array_spec(config, n_channels, grid_size)
    shapes = {feature_name: feature_shape, "gt": crop.gt.shape}
    dtypes = {feature_name: config.features_dtype, "gt": crop.gt.dtype.name}
    chunks = {feature_name: chunks_of_features, "gt": clamp_chunks(crop.gt.shape, DEFAULT_LABEL_CHUNKS)}
    if crop.mask is not None:
        shapes["mask"], dtypes["mask"], chunks["mask"] = crop.mask.shape, "uint8", clamp_chunks(crop.mask.shape, DEFAULT_LABEL_CHUNKS)
    if config.save_raw:
        shapes["raw"], dtypes["raw"], chunks["raw"] = crop.raw.shape, crop.raw.dtype.name, clamp_chunks(crop.raw.shape, DEFAULT_RAW_CHUNKS)
    stores = {}
    for name in shapes:
        grid = crop.raw_grid if name == "raw" else crop.label_grid
        # the token grids do not sit on a voxel grid: they carry their planes instead
        attributes = {} if name == "tokens" else grid.array_attributes(channel_axis=name == "features")
        attributes["dinov3_cache"] = {"commit_id": commit_id, "volume_index": config.volume_index, "array": name}
        if name == "tokens":
            attributes["dinov3_cache"]["planes"] = list(config.planes)
        dims = TOKEN_DIMENSIONS if name == "tokens" else (["c"] if name == "features" else []) + ["z", "y", "x"]
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

    @property
    def unit(self) -> tuple[int, ...]:
        """The block a write must fill whole (a chunk in zarr v2, a shard in v3)."""
        store = self.staged.stores[self.name]
        return write_unit(tuple(store.shape), self.staged.chunks[self.name], self.zarr_format)

    def put(self, origin: tuple[int, ...], shape: tuple[int, ...], compute_channels: Callable[[int, int], torch.Tensor]) -> None:
        block = assemble_block(shape, compute_channels, self.buffers, self.stats)
        self.writer.write(self.name, self.staged.stores[self.name], origin, to_numpy(block, self.dtype),
                          self.staged.chunks[self.name], release=lambda: self.buffers.give_back(block))


def write_features(
    loaded: LoadedModel, crop: SourceCrop, config: ExtractionConfig, staged: StagedArrays,
    writer: AsyncBlockWriter, stats: FeatureStatistics, progress: SliceProgress,
) -> None:
    """Run the planes through the model and write the volume's features in its layout."""
    name = feature_array_name(config.layout)
    buffers = BlockBuffers(config.features_dtype, pinned=loaded.device.type == "cuda")
    output = FeatureOutput(name, staged, writer, buffers, stats, config.features_dtype, config.storage.zarr_format)
    d, unit = config.geometry.output_image_dim, output.unit
    if name == "tokens":
        for position, start, grids in plane_token_slabs(loaded, crop, config.planes, d, config.batch_size, unit[2], progress):
            output.put((position, 0, start, 0, 0), (1, *grids.shape), lambda lo, hi, g=grids: g.unsqueeze(0))  # one block: all channels
        return
    streaming_axis = PLANE_AXES[plane_order(config.planes)[1]][0]
    slabs = dense_token_slabs(loaded, crop, config.planes, d, config.batch_size, unit[1 + streaming_axis], progress)
    for grids, start, stop in slabs:
        write_dense_slab(grids, start, stop, streaming_axis, d, unit, output)


def block_tokens(grids: dict[str, torch.Tensor], ranges: list[tuple[int, int]], c0: int, c1: int) -> dict[str, torch.Tensor]:
    """Each plane's grids over a block: channels c0:c1, the block's slices along the normal
    (a held plane holds every slice, the streaming one just the slab's)."""
    out = {}
    for plane, g in grids.items():
        lo, hi = ranges[PLANE_AXES[plane][0]]
        out[plane] = g[c0:c1] if g.shape[1] == hi - lo else g[c0:c1, lo:hi]
    return out


def write_dense_slab(
    grids: dict[str, torch.Tensor], start: int, stop: int, slab_axis: int, d: int, unit: tuple[int, ...],
    output: FeatureOutput,
) -> None:
    """The dense features of the slab start:stop along slab_axis, as write-unit-aligned blocks
    of at most BLOCK_BYTES (channel units x tiles along the next axis), each computed by
    `features_from_tokens` from the token grids held."""
    n_channels = next(iter(grids.values())).shape[0]
    grid_size = next(iter(grids.values())).shape[-1]
    itemsize = torch.finfo(getattr(torch, output.dtype)).bits // 8
    tile_axis = next(a for a in range(3) if a != slab_axis)
    bytes_per_row = min(unit[0], n_channels) * (stop - start) * d * itemsize
    tile = max(unit[1 + tile_axis], BLOCK_BYTES // bytes_per_row // unit[1 + tile_axis] * unit[1 + tile_axis])
    for t0 in range(0, d, tile):
        ranges = [(0, d)] * 3
        ranges[slab_axis] = (start, stop)
        ranges[tile_axis] = (t0, min(d, t0 + tile))

        def compute(c0: int, c1: int, ranges=ranges) -> torch.Tensor:
            return features_from_tokens(block_tokens(grids, ranges, c0, c1), d, ranges, grid_size)

        for c0 in range(0, n_channels, unit[0]):
            origin = (c0, *(lo for lo, _ in ranges))
            shape = (min(unit[0], n_channels - c0), *(hi - lo for lo, hi in ranges))
            output.put(origin, shape, lambda lo, hi, c0=c0, f=compute: f(c0 + lo, c0 + hi))
