"""Token grids of a crop: slicing along a plane, intensity normalisation, the forward pass
batch by batch, and the grids regrouped into slabs aligned with the arrays' write units.

Grids are handed out in the stored layout of a plane, (C, n, g, g) (see upsampling.py). For
the dense layout the planes other than the streaming one (xy when present) are held whole,
1/16 of the output size each, and the streaming plane comes slab by slab, so the whole float32
volume is never in memory; for the tokens layout every plane comes slab by slab.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import numpy as np
import torch

from dinov3_cache.extraction.config import PLANE_AXES
from dinov3_cache.extraction.model import LoadedModel, token_grids
from dinov3_cache.sources.base import SourceCrop

BLOCK_BYTES = 64 * 2**20  # a feature block handed to the writer (a few are in flight at once)


class SliceProgress(Protocol):
    def update(self, n: int) -> None: ...


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


def plane_order(planes: tuple[str, ...]) -> tuple[list[str], str]:
    """Held planes first; the streaming plane (xy when present) last."""
    streaming = "xy" if "xy" in planes else planes[-1]
    return [p for p in planes if p != streaming], streaming


def iter_plane_grids(
    loaded: LoadedModel, crop: SourceCrop, plane: str, n_slices: int, batch_size: int, progress: SliceProgress
) -> Iterator[tuple[int, torch.Tensor]]:
    """(first slice index, token grids (C, m, g, g) in stored layout) for each batch of a plane's slices."""
    for start in range(0, n_slices, batch_size):
        stop = min(n_slices, start + batch_size)
        slices = plane_slices(crop.raw, plane, n_slices, start, stop, loaded.device)
        yield start, token_grids(loaded, normalise(slices, crop.raw_range, loaded.normalization)).transpose(0, 1)
        progress.update(stop - start)


def iter_slabs(batches: Iterator[tuple[int, torch.Tensor]], slab: int, n_slices: int) -> Iterator[tuple[int, torch.Tensor]]:
    """Batches regrouped into slabs of `slab` slices (the last may be shorter): (start, grids)."""
    pending: list[torch.Tensor] = []
    done = 0
    for start, batch in batches:
        pending.append(batch)
        available = start + batch.shape[1]
        while available - done >= slab or (available == n_slices and done < n_slices):
            stop = min(n_slices, done + slab)
            grids = torch.cat(pending, dim=1) if len(pending) > 1 else pending[0]
            ready, rest = grids[:, : stop - done], grids[:, stop - done :]
            pending = [rest] if rest.shape[1] else []
            yield done, ready
            done = stop


def held_plane_grids(
    loaded: LoadedModel, crop: SourceCrop, plane: str, n_slices: int, batch_size: int, progress: SliceProgress
) -> torch.Tensor:
    """Every token grid of a plane, (C, n_slices, g, g), filled batch by batch in place (a
    concatenation would hold the plane twice)."""
    held = None
    for start, grids in iter_plane_grids(loaded, crop, plane, n_slices, batch_size, progress):
        if held is None:
            held = torch.empty((grids.shape[0], n_slices, *grids.shape[2:]), dtype=grids.dtype, device=grids.device)
        held[:, start : start + grids.shape[1]].copy_(grids)
    return held


def dense_token_slabs(
    loaded: LoadedModel, crop: SourceCrop, planes: tuple[str, ...], n_slices: int, batch_size: int, slab: int,
    progress: SliceProgress,
) -> Iterator[tuple[dict[str, torch.Tensor], int, int]]:
    """(grids by plane, start, stop) for each slab start:stop along the streaming plane's
    normal: the held planes whole, the streaming plane's slices start:stop."""
    held_planes, streaming = plane_order(planes)
    held = {plane: held_plane_grids(loaded, crop, plane, n_slices, batch_size, progress) for plane in held_planes}
    batches = iter_plane_grids(loaded, crop, streaming, n_slices, batch_size, progress)
    for start, grids in iter_slabs(batches, slab, n_slices):
        yield {**held, streaming: grids}, start, start + grids.shape[1]


def plane_token_slabs(
    loaded: LoadedModel, crop: SourceCrop, planes: tuple[str, ...], n_slices: int, batch_size: int, slab: int,
    progress: SliceProgress,
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """(plane position, first slice, grids (C, m, g, g)) for each slab of every plane, in turn:
    what the tokens layout stores, with no plane held."""
    for position, plane in enumerate(planes):
        batches = iter_plane_grids(loaded, crop, plane, n_slices, batch_size, progress)
        for start, grids in iter_slabs(batches, slab, n_slices):
            yield position, start, grids
