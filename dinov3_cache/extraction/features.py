"""Features from token grids: slicing a crop along a plane, intensity normalisation, the
forward pass batch by batch, bilinear upsampling as separable interpolation matrices, and the
plane average handed out as write-unit-aligned blocks.

Planes other than the streaming one (xy when present) are held as token grids, 1/16 of the
output size; the streaming plane then produces the output slab by slab, so the whole float32
volume is never in memory.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Protocol

import numpy as np
import torch

from dinov3_cache.extraction.config import PLANE_AXES, ExtractionConfig, PreprocessingError
from dinov3_cache.extraction.model import LoadedModel, token_grids
from dinov3_cache.geometry import CropGeometry
from dinov3_cache.sources.base import SourceCrop
from dinov3_cache.zarr_arrays import feature_chunks, write_unit

BLOCK_BYTES = 64 * 2**20  # a feature block handed to the writer (a few are in flight at once)

EmitBlock = Callable[[tuple[int, ...], tuple[int, ...], Callable[[int, int], torch.Tensor]], None]


class SliceProgress(Protocol):
    def update(self, n: int) -> None: ...


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


def plane_order(planes: tuple[str, ...]) -> tuple[list[str], str]:
    """Held planes first; the streaming plane (xy when present) last."""
    streaming = "xy" if "xy" in planes else planes[-1]
    return [p for p in planes if p != streaming], streaming


def iter_plane_grids(
    loaded: LoadedModel, crop: SourceCrop, plane: str, n_slices: int, batch_size: int, progress: SliceProgress
) -> Iterator[tuple[int, torch.Tensor]]:
    """(first slice index, token grids) for each batch of a plane's slices."""
    for start in range(0, n_slices, batch_size):
        stop = min(n_slices, start + batch_size)
        slices = plane_slices(crop.raw, plane, n_slices, start, stop, loaded.device)
        yield start, token_grids(loaded, normalise(slices, crop.raw_range, loaded.normalization))
        progress.update(stop - start)


def held_plane_grids(
    loaded: LoadedModel, crop: SourceCrop, plane: str, n_slices: int, batch_size: int, progress: SliceProgress
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
    emit_block: EmitBlock,
    progress: SliceProgress,
) -> None:
    """Compute the features and hand them out as write-unit-aligned blocks: origin and
    shape (channels, z, y, x) and a function giving the block's channels lo:hi as float32.
    `progress` counts the slices run through the model."""
    d = config.geometry.output_image_dim
    held_planes, streaming = plane_order(config.planes)
    n_channels = loaded.hidden_size
    shape = (n_channels, d, d, d)
    unit = write_unit(shape, feature_chunks(shape, config.storage.feature_chunks), config.storage.zarr_format)
    slab_axis = PLANE_AXES[streaming][0]
    slab = unit[1 + slab_axis]
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
    emit_block: EmitBlock,
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
