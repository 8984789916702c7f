"""Reading a window from an opened level: raw as an exact area mean, labels as the voxel
holding each centre with a mask of where labels exist, instance ids and intensity range."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from dinov3_cache.sources.base import SourceError
from dinov3_cache.sources.cellmap.ome_ngff import TOLERANCE, LevelArray, format_voxel

MAX_RAW_READ_BYTES = 8 * 2**30  # a finer level read for resampling must fit in memory


@dataclass(frozen=True)
class ReadPiece:
    """What one read took from a level: the level voxels of each axis (z, y, x) and their
    values as stored, for the source signature (signing.py)."""

    array: LevelArray
    axes: tuple[np.ndarray, np.ndarray, np.ndarray]
    values: np.ndarray


def regular_step(edges: np.ndarray) -> int | None:
    """The whole number of input voxels per output voxel, if the edges fall on voxel borders."""
    rounded = np.round(edges)
    if not np.all(np.abs(edges - rounded) < TOLERANCE):
        return None
    steps = np.diff(rounded).astype(int)
    return int(steps[0]) if steps[0] > 0 and np.all(steps == steps[0]) else None


def area_mean_axis(block: np.ndarray, axis: int, edges: np.ndarray) -> np.ndarray:
    """Mean of a piecewise-constant signal over [edges[j], edges[j+1]) along axis
    (edges in input-voxel units from the block's start): exact area weights."""
    n_in = block.shape[axis]
    step = regular_step(edges)
    if step is not None:  # whole input voxels per output voxel: a slice or a block mean
        span = [slice(None)] * block.ndim
        span[axis] = slice(int(round(edges[0])), int(round(edges[-1])))
        taken = block[tuple(span)]
        if step == 1:
            return taken
        shape = list(taken.shape)
        shape[axis : axis + 1] = [len(edges) - 1, step]
        return taken.reshape(shape).mean(axis=axis + 1, dtype=np.float32)
    values = np.moveaxis(block, axis, 0).astype(np.float32)
    cumulative = np.concatenate([np.zeros((1, *values.shape[1:]), np.float32), np.cumsum(values, axis=0, dtype=np.float32)])
    e = np.clip(edges, 0, n_in)
    whole = np.minimum(np.floor(e).astype(int), n_in - 1)
    frac = (e - whole).astype(np.float32).reshape(-1, *([1] * (values.ndim - 1)))
    integral = cumulative[whole] + frac * values[whole]
    out = (integral[1:] - integral[:-1]) / np.diff(e).astype(np.float32).reshape(-1, *([1] * (values.ndim - 1)))
    return np.moveaxis(out, 0, axis)


def read_raw(array: LevelArray, start_nm: np.ndarray, target_nm: float, n: int, reads: list | None = None) -> np.ndarray:
    """n^3 raw voxels of target_nm from start_nm: a direct read where the level matches,
    an area mean of the finer level otherwise (rounded back to integer dtypes). `reads`
    receives a ReadPiece of what was read."""
    scale = np.asarray(array.level.scale)
    edges = [(start_nm[a] + np.arange(n + 1) * target_nm - array.lo[a]) / scale[a] for a in range(3)]
    first = [max(0, int(math.floor(e[0] + TOLERANCE))) for e in edges]
    last = [min(int(array.shape[a]), int(math.ceil(e[-1] - TOLERANCE))) for a, e in enumerate(edges)]
    nbytes = int(np.prod([entry - f for f, entry in zip(first, last)])) * array.store.dtype.numpy_dtype.itemsize
    if nbytes > MAX_RAW_READ_BYTES:
        raise SourceError(
            f"raw level {array.url} ({format_voxel(array.level.scale)} nm) is much finer than {target_nm:g} nm: one crop would read "
            f"{nbytes / 2**30:.1f} GiB; add coarser levels to the pyramid or raise --min-resolution-for-raw"
        )
    block = array.store[tuple(slice(f, entry) for f, entry in zip(first, last))].read().result()
    if reads is not None:
        reads.append(ReadPiece(array, tuple(np.arange(f, entry) for f, entry in zip(first, last)), block))
    # whole-voxel axes first: they shrink the block before any fractional axis needs float copies
    for axis in sorted(range(3), key=lambda a: regular_step(edges[a] - first[a]) is None):
        block = area_mean_axis(block, axis, edges[axis] - first[axis])
    dtype = array.store.dtype.numpy_dtype
    if block.dtype != dtype:
        if np.issubdtype(dtype, np.integer):
            info = np.iinfo(dtype)
            block = np.clip(np.rint(block), info.min, info.max)
        block = block.astype(dtype)
    return np.ascontiguousarray(block)


def read_labels(
    array: LevelArray, start_nm: np.ndarray, target_nm: float, n: int, reads: list | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """n^3 labels of target_nm from start_nm, each the level voxel holding its centre,
    and a mask of the voxels whose centre lies inside the array (0 labels elsewhere)."""
    scale = np.asarray(array.level.scale)
    index, valid = [], []
    for a in range(3):
        centres = start_nm[a] + (np.arange(n) + 0.5) * target_nm
        i = np.floor((centres - array.lo[a]) / scale[a] + TOLERANCE).astype(np.int64)
        index.append(i)
        valid.append((i >= 0) & (i < array.shape[a]))
    mask = valid[0][:, None, None] & valid[1][None, :, None] & valid[2][None, None, :]
    if not all(v.any() for v in valid):
        return np.zeros((n, n, n), array.store.dtype.numpy_dtype), mask
    inside = [i[v] for i, v in zip(index, valid)]
    if all(np.array_equal(i, np.arange(i[0], i[0] + len(i))) for i in inside):
        values = array.store[tuple(slice(int(i[0]), int(i[-1]) + 1) for i in inside)].read().result()
    else:
        values = array.store.oindex[tuple(inside)].read().result()
    if reads is not None:
        reads.append(ReadPiece(array, tuple(inside), values))
    if all(v.all() for v in valid):
        return values, mask
    labels = np.zeros((n, n, n), values.dtype)
    labels[np.ix_(*valid)] = values
    return labels, mask


def instance_dtype(dtype: np.dtype) -> np.dtype:
    """Instance ids keep their values: uint32 for ids of up to 32 bits, uint64 beyond."""
    return np.dtype(np.uint32) if np.dtype(dtype).itemsize <= 4 else np.dtype(np.uint64)


def as_instance_ids(labels: np.ndarray, url: str) -> np.ndarray:
    if np.issubdtype(labels.dtype, np.signedinteger) and labels.size and labels.min() < 0:
        raise SourceError(f"labels at {url} hold negative ids ({labels.min()}); ids must be >= 0")
    if not np.issubdtype(labels.dtype, np.integer):
        raise SourceError(f"labels at {url} are {labels.dtype}, not integers; point the organelle at a label array")
    return labels.astype(instance_dtype(labels.dtype), copy=False)


def raw_intensity_range(dtype: np.dtype) -> tuple[float, float]:
    """Integer raw maps its full range to [0, 1]; float raw is taken as already in [0, 1]."""
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return float(info.min), float(info.max)
    return 0.0, 1.0
