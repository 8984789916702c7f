"""The dense form (the default): features (C, D, H, W) in `volume_XXXXXX_features.zarr`, on
the voxel grid of the labels, written block by block with `features_from_tokens`, read back
as they are."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dinov3_cache.storage.base import BlockOutput, CropTokens, FeatureStorage, register_storage
from dinov3_cache.storage.planes import PLANE_AXES
from dinov3_cache.zarr_arrays import dtype_itemsize


class DenseStorage(FeatureStorage):
    name = "dense"
    description = "(C, D, H, W) features"
    array_name = "features"
    # 2 MB float16 chunks: a random 64^3 crop reads < 2x its bytes, a volume is ~2,000 files,
    # and writes run near disk speed (benchmarks/bench_write_path.py)
    default_chunks = (256, 16, 16, 16)
    chunk_axes = "C,Z,Y,X"
    dimension_names = ("c", "z", "y", "x")

    def array_shape(self, channels: int, out_dim: int, planes: Sequence[str], grid_size: int) -> tuple[int, ...]:
        return (channels, out_dim, out_dim, out_dim)

    def write_features(self, tokens: CropTokens, output: BlockOutput) -> None:
        """The planes but the streaming one are held whole, the streaming plane comes slab by
        slab (one write unit thick), so the whole float32 volume is never in memory."""
        axis, unit = tokens.streaming_axis, output.unit
        for grids, start, stop in tokens.streamed_slabs(unit[1 + axis]):
            write_dense_slab(grids, start, stop, axis, tokens.out_dim, output)

    def read_region(self, store, planes: Sequence[str], region: Sequence[tuple[int, int]]) -> np.ndarray:
        window = (slice(None), *(slice(lo, hi) for lo, hi in region))
        return store[window].read().result().astype("float32")

    def start_read(self, reader, spatial: Sequence[slice], out, allocate=None):
        channels = reader.shape(self.array_name)[0]
        return None, [reader.start_region(self.array_name, (slice(0, channels), *spatial), out)]


def block_tokens(grids: dict, ranges: list[tuple[int, int]], c0: int, c1: int) -> dict:
    """Each plane's grids over a block: channels c0:c1, the block's slices along the normal
    (a held plane holds every slice, the streaming one just the slab's)."""
    out = {}
    for plane, g in grids.items():
        lo, hi = ranges[PLANE_AXES[plane][0]]
        out[plane] = g[c0:c1] if g.shape[1] == hi - lo else g[c0:c1, lo:hi]
    return out


def write_dense_slab(grids: dict, start: int, stop: int, slab_axis: int, d: int, output: BlockOutput) -> None:
    """The dense features of the slab start:stop along slab_axis, as write-unit-aligned blocks
    of at most output.block_bytes (channel units x tiles along the next axis), each computed by
    `features_from_tokens` from the token grids held."""
    from dinov3_cache.storage.upsampling import features_from_tokens  # torch: only when writing

    unit = output.unit
    n_channels = next(iter(grids.values())).shape[0]
    grid_size = next(iter(grids.values())).shape[-1]
    tile_axis = next(a for a in range(3) if a != slab_axis)
    bytes_per_row = min(unit[0], n_channels) * (stop - start) * d * dtype_itemsize(output.dtype)
    tile = max(unit[1 + tile_axis], output.block_bytes // bytes_per_row // unit[1 + tile_axis] * unit[1 + tile_axis])
    for t0 in range(0, d, tile):
        ranges = [(0, d)] * 3
        ranges[slab_axis] = (start, stop)
        ranges[tile_axis] = (t0, min(d, t0 + tile))

        def compute(c0: int, c1: int, ranges=ranges):
            return features_from_tokens(block_tokens(grids, ranges, c0, c1), d, ranges, grid_size)

        for c0 in range(0, n_channels, unit[0]):
            origin = (c0, *(lo for lo, _ in ranges))
            shape = (min(unit[0], n_channels - c0), *(hi - lo for lo, hi in ranges))
            output.put(origin, shape, lambda lo, hi, c0=c0, f=compute: f(c0 + lo, c0 + hi))


DENSE = register_storage(DenseStorage())
