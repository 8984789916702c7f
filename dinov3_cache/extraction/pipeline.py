"""DINOv3 feature extraction for one volume, streamed into a TensorStore cache.

The pipeline, per volume:

1. A source turns the index into a crop: raw at slice resolution (S^3) and labels (D^3).
2. For each plane (xy, xz, yz) the raw is area-averaged along the plane's normal to D
   slices of S x S, normalised, and run through the ViT in batches. Patch tokens
   (CLS and registers dropped) give a (C, S/p, S/p) grid per slice.
3. Grids are upsampled bilinearly (align_corners=False) to D x D and the planes are
   averaged into features (C, D, H, W).
4. Planes other than the streaming one (xy when present) are held as token grids,
   1/16 of the output size. The streaming plane then produces the output slab by slab,
   each slab written asynchronously while the next slices are computed, so the whole
   float32 volume is never in memory.
5. Arrays are written under OUT/volume_XXXXXX.partial/, moved into place, and the
   metadata file (the commit marker) is written last, atomically.

The model itself (loading, the forward pass) lives in dinov3_model.py.
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import logging
import math
import os
import platform
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import tensorstore as ts
import torch

from dinov3_cache.errors import named_first_line
from dinov3_cache.extraction.config import PLANE_AXES, UPSAMPLING, ExtractionConfig, PreprocessingError
from dinov3_cache.layout import (
    VolumeLock,
    VolumePaths,
    bytes_on_disk,
    config_fingerprint,
    fsync_directory,
    now_iso,
    partial_debris,
    read_json,
    remove_tree,
    scheduler_job_id,
    seal_metadata,
    write_json_atomic,
    write_status,
)
from dinov3_cache.extraction.model import LoadedModel, load_model, token_grids
from dinov3_cache.sources.base import CropGeometry, SourceCrop, VolumeSource
from dinov3_cache.zarr_arrays import (
    CHECKSUM_ALGORITHM,
    DEFAULT_LABEL_CHUNKS,
    DEFAULT_RAW_CHUNKS,
    block_checksums,
    clamp_chunks,
    feature_chunks,
    codec_description,
    create_array,
    ts_context,
    write_unit,
)

log = logging.getLogger("dinov3_preprocessing")

LOG_EVERY_SECONDS = 30.0


class Terminated(Exception):
    """SIGTERM arrived (a scheduler's walltime or kill): the run records it and cleans up."""

    def __init__(self, signum: int):
        super().__init__(f"terminated by signal {signum} (a walltime or scheduler kill); rerun to finish the volume")
        self.signum = signum


def raise_on_sigterm() -> None:
    """Turn SIGTERM into an exception, so a killed job says so in its status record."""
    import signal

    def handler(signum, frame):
        raise Terminated(signum)

    signal.signal(signal.SIGTERM, handler)


# ----------------------------------------------------------------------------- configuration


# ----------------------------------------------------------------------------- slicing and the forward pass


def check_slice_size(geometry: CropGeometry, patch_size: int) -> None:
    if geometry.slice_size % patch_size:
        raise PreprocessingError(
            f"slice size {geometry.slice_size} (= --output-image-dim {geometry.output_image_dim} x "
            f"{geometry.raw_per_label} raw voxels per label voxel) is not a multiple of the model's patch size "
            f"{patch_size}; change --output-image-dim or the resolutions"
        )


def plane_slices(
    raw: np.ndarray, plane: str, n_slices: int, start: int, stop: int, device: torch.device
) -> torch.Tensor:
    """Slices start:stop of a plane, as float in raw units: raw area-averaged along the
    plane's normal to n_slices positions. Shape (stop - start, S, S), image axes in z, y, x order."""
    normal, _ = PLANE_AXES[plane]
    factor = raw.shape[normal] // n_slices
    view = np.moveaxis(raw, normal, 0)[start * factor : stop * factor]
    block = torch.from_numpy(np.ascontiguousarray(view)).to(device, non_blocking=True)
    return block.reshape(stop - start, factor, *block.shape[1:]).float().mean(dim=1)


def normalise(slices: torch.Tensor, raw_range: tuple[float, float], normalization: dict) -> torch.Tensor:
    """Raw units -> [0, 1] -> grey copied to 3 channels -> (x - mean) / std."""
    lo, hi = raw_range
    grey = ((slices - lo) / (hi - lo)).clamp_(0, 1)
    mean = torch.tensor(normalization["mean"], device=slices.device).view(1, 3, 1, 1)
    std = torch.tensor(normalization["std"], device=slices.device).view(1, 3, 1, 1)
    return (grey.unsqueeze(1) - mean) / std


# ----------------------------------------------------------------------------- upsampling


def linear_weights(in_size: int, out_size: int, start: int, stop: int, device: torch.device):
    """Source indices and weights of linear interpolation for outputs start:stop, with the
    same arithmetic as torch's bilinear upsampling (align_corners=False)."""
    scale = in_size / out_size
    dst = torch.arange(start, stop, device=device, dtype=torch.float32)
    src = ((dst + 0.5) * scale - 0.5).clamp_(min=0)
    i0 = src.floor().long().clamp_(max=in_size - 1)
    i1 = (i0 + 1).clamp_(max=in_size - 1)
    return i0, i1, src - i0


def interpolation_matrix(in_size: int, out_size: int, start: int, stop: int, device: torch.device) -> torch.Tensor:
    """(stop - start, in_size): row i holds the two weights of output start + i."""
    i0, i1, lam = linear_weights(in_size, out_size, start, stop, device)
    rows = torch.arange(stop - start, device=device)
    matrix = torch.zeros(stop - start, in_size, device=device)
    matrix.index_put_((rows, i0), 1 - lam, accumulate=True)
    matrix.index_put_((rows, i1), lam, accumulate=True)
    return matrix


def interpolate_dim(x: torch.Tensor, dim: int, matrix: torch.Tensor) -> torch.Tensor:
    """Linear interpolation along one dim, as one matrix product (a dense product beats
    gathering the two neighbours on CPUs and GPUs alike); the result is contiguous."""
    if dim == x.dim() - 1:
        return x @ matrix.T
    before, after = x.shape[:dim], x.shape[dim + 1 :]
    out = torch.matmul(matrix, x.reshape(-1, x.shape[dim], math.prod(after)))
    return out.reshape(*before, matrix.shape[0], *after)


# permutation of a plane's grids (slice, c, image axis a, image axis b) to (c, z, y, x) order
SPATIAL_LAYOUT = {"xy": (1, 0, 2, 3), "xz": (1, 2, 0, 3), "yz": (1, 2, 3, 0)}


def spatial_layout(grids: torch.Tensor, plane: str) -> torch.Tensor:
    """Token grids (m, c, g, g) of a plane as (c, z, y, x) with g-sized image axes."""
    return grids.permute(*SPATIAL_LAYOUT[plane]).contiguous()


def plane_contribution(grids: torch.Tensor, plane: str, out_dim: int, ranges: list[tuple[int, int]]) -> torch.Tensor:
    """A plane's upsampled features over a block, (c, dz, dy, dx). `grids` is in spatial
    layout and holds the plane's slices inside the block; `ranges` are the block's
    (start, stop) along z, y, x. Bilinear upsampling is separable: one axis at a time,
    the one with fewer outputs first."""
    _, image_axes = PLANE_AXES[plane]
    x = grids
    for axis in sorted(image_axes, key=lambda a: ranges[a][1] - ranges[a][0]):
        matrix = interpolation_matrix(x.shape[1 + axis], out_dim, *ranges[axis], x.device)
        x = interpolate_dim(x, 1 + axis, matrix)
    return x


# ----------------------------------------------------------------------------- writing


COMPUTE_CHANNELS = 64  # channels upsampled at once: bounds the float32 temporaries
BLOCK_BYTES = 64 * 2**20  # a feature block handed to the writer (a few are in flight at once)


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
    stats: "FeatureStatistics",
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
        grid = config.geometry.raw_grid(crop.offset_nm) if name == "raw" else config.geometry.label_grid(crop.offset_nm)
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


# ----------------------------------------------------------------------------- extraction


class FeatureStatistics:
    """Running statistics of the features, kept on the compute device (no sync per block)."""

    def __init__(self) -> None:
        self.count = 0
        self.sums: torch.Tensor | None = None  # sum, sum of squares, non-finite count
        self.low: torch.Tensor | None = None
        self.high: torch.Tensor | None = None

    def add(self, block: torch.Tensor) -> None:
        sums = torch.stack([
            block.sum(dtype=torch.float64),
            block.square().sum(dtype=torch.float64),
            (~torch.isfinite(block)).sum(dtype=torch.float64),
        ])
        low, high = block.min(), block.max()
        self.count += block.numel()
        if self.sums is None:
            self.sums, self.low, self.high = sums, low, high
        else:
            self.sums += sums
            self.low, self.high = torch.minimum(self.low, low), torch.maximum(self.high, high)

    def summary(self) -> dict:
        if self.sums is None:
            return {}
        total, total_sq, non_finite = self.sums.tolist()
        mean = total / self.count
        var = max(total_sq / self.count - mean * mean, 0.0)
        return {"mean": mean, "std": var**0.5, "min": float(self.low), "max": float(self.high), "non_finite": int(non_finite)}


class Progress:
    """A tqdm bar on a terminal; plain periodic lines in a log file."""

    def __init__(self, total: int, label: str):
        self.total, self.done, self.label = total, 0, label
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=label, unit="slice", leave=False)
        self.started = self.last_line = time.perf_counter()

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.perf_counter()
        if now - self.last_line >= LOG_EVERY_SECONDS or self.done == self.total:
            rate = self.done / max(now - self.started, 1e-9)
            print(f"{self.label}: {self.done}/{self.total} slices ({rate:.1f} slices/s)", file=sys.stderr, flush=True)
            self.last_line = now

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def plane_order(planes: tuple[str, ...]) -> tuple[list[str], str]:
    """Held planes first; the streaming plane (xy when present) last."""
    streaming = "xy" if "xy" in planes else planes[-1]
    return [p for p in planes if p != streaming], streaming


def iter_plane_grids(
    loaded: LoadedModel, crop: SourceCrop, plane: str, n_slices: int, batch_size: int, progress: Progress
) -> Iterator[tuple[int, torch.Tensor]]:
    """(first slice index, token grids) for each batch of a plane's slices."""
    for start in range(0, n_slices, batch_size):
        stop = min(n_slices, start + batch_size)
        slices = plane_slices(crop.raw, plane, n_slices, start, stop, loaded.device)
        yield start, token_grids(loaded, normalise(slices, crop.raw_range, loaded.normalization))
        progress.update(stop - start)


def held_plane_grids(
    loaded: LoadedModel, crop: SourceCrop, plane: str, n_slices: int, batch_size: int, progress: Progress
) -> torch.Tensor:
    """Every token grid of a plane, in spatial layout, filled batch by batch in place (a
    concatenation would hold the plane twice)."""
    order = SPATIAL_LAYOUT[plane]
    held = None
    for start, grids in iter_plane_grids(loaded, crop, plane, n_slices, batch_size, progress):
        if held is None:
            full = (n_slices, *grids.shape[1:])
            held = torch.empty([full[i] for i in order], dtype=grids.dtype, device=grids.device)
        held.narrow(order.index(0), start, len(grids)).copy_(grids.permute(*order))
    return held


def extract_features(
    loaded: LoadedModel,
    crop: SourceCrop,
    config: ExtractionConfig,
    emit_block: Callable[[tuple[int, ...], tuple[int, ...], Callable[[int, int], torch.Tensor]], None],
) -> None:
    """Compute the features and hand them out as write-unit-aligned blocks: origin and
    shape (channels, z, y, x) and a function giving the block's channels lo:hi as float32."""
    d = config.geometry.output_image_dim
    held_planes, streaming = plane_order(config.planes)
    n_channels = loaded.hidden_size
    shape = (n_channels, d, d, d)
    unit = write_unit(shape, feature_chunks(shape, config.storage.feature_chunks), config.storage.zarr_format)
    slab_axis = PLANE_AXES[streaming][0]
    slab = unit[1 + slab_axis]
    progress = Progress(d * len(config.planes), f"volume {config.volume_index}")
    held = {plane: held_plane_grids(loaded, crop, plane, d, config.batch_size, progress) for plane in held_planes}
    pending: list[torch.Tensor] = []
    done = 0
    for start, batch in iter_plane_grids(loaded, crop, streaming, d, config.batch_size, progress):
        pending.append(batch)
        available = start + len(batch)
        while available - done >= slab or (available == d and done < d):
            stop = min(d, done + slab)
            grids = torch.cat(pending)
            ready, rest = grids[: stop - done], grids[stop - done :]
            pending = [rest] if len(rest) else []
            emit_slab(spatial_layout(ready, streaming), streaming, held, done, stop, slab_axis, d, unit,
                      torch.finfo(getattr(torch, config.features_dtype)).bits // 8, emit_block)
            done = stop
    progress.close()


def emit_slab(
    streaming_grids: torch.Tensor,
    streaming: str,
    held: dict[str, torch.Tensor],
    start: int,
    stop: int,
    slab_axis: int,
    d: int,
    unit: tuple[int, ...],
    itemsize: int,
    emit_block: Callable[[tuple[int, ...], tuple[int, ...], Callable[[int, int], torch.Tensor]], None],
) -> None:
    """Hand out the slab start:stop along slab_axis as write-unit-aligned blocks of at most
    BLOCK_BYTES (channel units x tiles along the next axis), each as a function that averages
    every plane over a channel range, computed on demand in small channel groups."""
    n_channels = streaming_grids.shape[0]
    tile_axis = next(a for a in range(3) if a != slab_axis)
    bytes_per_row = min(unit[0], n_channels) * (stop - start) * d * itemsize
    tile = max(unit[1 + tile_axis], BLOCK_BYTES // bytes_per_row // unit[1 + tile_axis] * unit[1 + tile_axis])
    n_planes = 1 + len(held)
    for t0 in range(0, d, tile):
        ranges = [(0, d)] * 3
        ranges[slab_axis] = (start, stop)
        ranges[tile_axis] = (t0, min(d, t0 + tile))

        def averaged(c0: int, c1: int, ranges=ranges) -> torch.Tensor:
            block = plane_contribution(streaming_grids[c0:c1], streaming, d, ranges)
            for plane, grids in held.items():
                normal = PLANE_AXES[plane][0]
                lo, hi = ranges[normal]
                block += plane_contribution(grids[c0:c1].narrow(1 + normal, lo, hi - lo), plane, d, ranges)
            return block.div_(n_planes)

        for c0 in range(0, n_channels, unit[0]):
            origin = (c0, *(lo for lo, _ in ranges))
            shape = (min(unit[0], n_channels - c0), *(hi - lo for lo, hi in ranges))
            emit_block(origin, shape, lambda lo, hi, c0=c0, f=averaged: f(c0 + lo, c0 + hi))


# ----------------------------------------------------------------------------- one volume, end to end


@dataclass
class VolumeOutcome:
    state: str  # complete | skipped
    message: str
    metadata: dict | None = None


def preprocess_volume(
    config: ExtractionConfig,
    source: VolumeSource,
    loaded: LoadedModel | None = None,
) -> VolumeOutcome:
    """Extract, write and commit one volume, under its lock. Raises PreprocessingError,
    SourceError or StorageError with an actionable one-line message."""
    paths = config.paths
    ensure_writable(paths.output_dir)
    with VolumeLock(paths):
        skip = existing_volume_check(config, source)
        if skip is not None:
            return skip
        for debris in partial_debris(paths):
            log.info("removing debris of an interrupted run: %s", debris)
            remove_tree(debris)
        write_status(paths, "running", started=now_iso())
        try:
            metadata = build_and_commit(config, source, loaded)
        except BaseException as e:
            write_status(paths, "failed", finished=now_iso(), error=named_first_line(e))
            remove_tree(paths.staging)
            raise
        write_status(paths, "complete", finished=now_iso(), timing=metadata["timing"])
        return VolumeOutcome("complete", f"volume {config.volume_index} complete: {paths.metadata}", metadata)


def ensure_writable(output_dir: Path) -> None:
    try:
        (output_dir / "logs").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PreprocessingError(f"cannot create output directory {output_dir} ({e.strerror}); choose a writable --output-dir") from None
    if not os.access(output_dir, os.W_OK | os.X_OK) or not os.access(output_dir / "logs", os.W_OK | os.X_OK):
        raise PreprocessingError(f"output directory {output_dir} is not writable; choose a writable --output-dir")


def existing_volume_check(config: ExtractionConfig, source: VolumeSource) -> VolumeOutcome | None:
    """Skip a complete volume made with the same configuration; refuse a different one
    unless --overwrite, which replaces it once the new one is ready."""
    paths = config.paths
    if not paths.metadata.exists() or config.overwrite:
        return None
    try:
        metadata = read_json(paths.metadata)
    except (OSError, json.JSONDecodeError) as e:
        raise PreprocessingError(
            f"volume {config.volume_index} has an unreadable metadata file {paths.metadata} ({e}); "
            "inspect it, or pass --overwrite to recompute the volume"
        ) from None
    existing = metadata.get("configuration", {}).get("fingerprint")
    wanted = config_fingerprint(config.fingerprint_values(source))
    if existing != wanted:
        raise PreprocessingError(
            f"volume {config.volume_index} already exists with a different configuration (fingerprint {existing}, "
            f"this run {wanted}); pass --overwrite to replace it, or use another --output-dir"
        )
    return VolumeOutcome(
        "skipped", f"volume {config.volume_index} is already complete; skipping (use --overwrite to recompute)", metadata
    )


def build_and_commit(config: ExtractionConfig, source: VolumeSource, loaded: LoadedModel | None) -> dict:
    paths = config.paths
    timing: dict[str, float] = {}
    t0 = time.perf_counter()
    if loaded is None:
        loaded = load_model(config.model_id, config.model_revision, config.device)
    timing["model_load_seconds"] = time.perf_counter() - t0
    check_slice_size(config.geometry, loaded.patch_size)

    t = time.perf_counter()
    crop = source.sample(config.volume_index, config.geometry, config.sampling)
    timing["source_read_seconds"] = time.perf_counter() - t

    t_volume = time.perf_counter()
    commit_id = uuid.uuid4().hex
    paths.staging.mkdir(parents=True)
    context = ts_context(config.storage.num_threads)
    staged = stage_arrays(config, crop, loaded.hidden_size, commit_id, context)
    writer = AsyncBlockWriter()
    stats = FeatureStatistics()

    buffers = BlockBuffers(config.features_dtype, pinned=loaded.device.type == "cuda")

    def emit(origin: tuple[int, ...], shape: tuple[int, ...], compute_channels: Callable[[int, int], torch.Tensor]) -> None:
        block = assemble_block(shape, compute_channels, buffers, stats)
        writer.write("features", staged.stores["features"], origin, to_numpy(block, config.features_dtype),
                     staged.chunks["features"], release=lambda: buffers.give_back(block))

    try:
        write_label_arrays(crop, staged, writer)
        t = time.perf_counter()
        extract_features(loaded, crop, config, emit)
        # the writes overlap the computation; only the time spent waiting on them is not extraction
        timing["feature_extraction_seconds"] = time.perf_counter() - t - writer.wait_seconds
        writer.flush()
    except BaseException:
        writer.abandon()
        raise
    timing["tensorstore_write_seconds"] = writer.wait_seconds
    storage = {name: bytes_on_disk(paths.staged_array(name)) for name in staged.stores}
    fingerprint_values = config.fingerprint_values(source)
    metadata = volume_metadata(config, loaded, crop, staged, writer.checksums, storage, stats, commit_id, fingerprint_values)
    commit_volume(paths, list(staged.stores))
    timing["total_seconds"] = time.perf_counter() - t_volume
    metadata["timing"] = {k: round(v, 4) for k, v in timing.items()}
    sealed = seal_metadata(metadata)
    write_json_atomic(paths.metadata, sealed)
    remove_tree(paths.staging)
    return sealed


def commit_volume(paths: VolumePaths, array_names: list[str]) -> None:
    """Move staged arrays into place. An existing volume (overwrite) stops being visible
    first: its metadata goes, then its arrays; the new metadata is written by the caller."""
    if paths.metadata.exists():
        paths.metadata.unlink()
        fsync_directory(paths.output_dir)
    old = paths.staging / "replaced"
    old.mkdir()
    for array in paths.existing_arrays():
        os.replace(array, old / array.name)
    for name in array_names:
        os.replace(paths.staged_array(name), paths.array(name))
    fsync_directory(paths.output_dir)


def volume_metadata(
    config: ExtractionConfig,
    loaded: LoadedModel,
    crop: SourceCrop,
    staged: StagedArrays,
    checksums: dict,
    storage_bytes: dict[str, int],
    stats: FeatureStatistics,
    commit_id: str,
    fingerprint_values: dict,
) -> dict:
    paths = config.paths
    shapes = {name: list(store.shape) for name, store in staged.stores.items()}
    shapes.setdefault("raw", list(crop.raw.shape))
    gb = {f"{name}_gb": round(n / 1e9, 6) for name, n in storage_bytes.items()}
    return {
        "volume_index": config.volume_index,
        "volume_name": paths.name,
        "timestamp": now_iso(),
        "paths": {name: str(paths.array(name).resolve()) for name in staged.stores},
        "source_dataset": crop.description,
        "shapes": shapes,
        "dtypes": {name: str(store.dtype.numpy_dtype) for name, store in staged.stores.items()},
        "configuration": {
            "model_id": config.model_id,
            "model_revision": loaded.identity.get("revision"),
            "pretrained": loaded.identity["pretrained"],
            "base_resolution": config.geometry.base_resolution,
            "min_resolution_for_raw": config.geometry.min_resolution_for_raw,
            "output_image_dim": config.geometry.output_image_dim,
            "slice_size": config.geometry.slice_size,
            "patch_size": loaded.patch_size,
            "planes": list(config.planes),
            "plane_combination": "mean",
            "slice_reduction": "area mean along the plane normal",
            "upsampling": UPSAMPLING,
            "normalization": loaded.normalization,
            "intensity_range": list(crop.raw_range),
            "organelles": list(config.sampling.organelles),
            "gt_extension": config.sampling.gt_extension,
            "filters": asdict(config.sampling.filters),
            "features_dtype": config.features_dtype,
            "compression": config.storage.compression,
            "zarr_format": config.storage.zarr_format,
            "chunks": list(staged.chunks["features"]),
            "codecs": codec_description(config.storage, shapes["features"], staged.chunks["features"]),
            "batch_size": config.batch_size,
            "device": str(loaded.device),
            "compute_dtype": str(loaded.compute_dtype).removeprefix("torch."),
            "voxel_size_nm": {"features": list(config.geometry.label_grid(crop.offset_nm).voxel_size_nm),
                              "raw": list(config.geometry.raw_grid(crop.offset_nm).voxel_size_nm)},
            "offset_nm": list(crop.offset_nm),
            "fingerprint": config_fingerprint(fingerprint_values),
            "fingerprint_inputs": fingerprint_values,
        },
        "storage": {**gb, "total_gb": round(sum(storage_bytes.values()) / 1e9, 6), "bytes": storage_bytes},
        "statistics": label_statistics(crop) | {"features": stats.summary()},
        "integrity": {
            "commit_id": commit_id,
            "algorithm": CHECKSUM_ALGORITHM,
            "chunks": {name: list(c) for name, c in staged.chunks.items()},
            "crc32": {name: dict(sorted(sums.items())) for name, sums in checksums.items()},
        },
        "provenance": provenance(loaded),
    }


def label_statistics(crop: SourceCrop) -> dict:
    classes = np.unique(crop.gt if crop.mask is None else crop.gt[crop.mask.astype(bool)])
    return {
        "num_classes": int(classes.size),
        "unique_classes": [int(c) for c in classes[:1000]],
        "valid_gt_fraction": 1.0 if crop.mask is None else float(crop.mask.mean()),
    }


def provenance(loaded: LoadedModel) -> dict:
    import transformers

    return {
        "model": loaded.identity,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tensorstore": getattr(ts, "__version__", package_version("tensorstore")),
            "numpy": np.__version__,
        },
        "host": platform.node(),
        "job_id": scheduler_job_id(),
        "command": sys.argv,
    }


def package_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None
