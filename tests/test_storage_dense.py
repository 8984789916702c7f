"""dinov3_cache/storage/dense.py: the dense form's array, its writing from token grids and its reads."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from dinov3_cache.geometry import VoxelGrid
from dinov3_cache.storage import storage_for
from dinov3_cache.storage.planes import PLANE_AXES, PLANES
from dinov3_cache.storage.upsampling import features_from_tokens
from dinov3_cache.zarr_arrays import StorageOptions, create_array, open_array, ts_context, write_unit

DENSE = storage_for("dense")


@dataclass
class WholeTokens:
    """CropTokens over grids already computed: (C, D, g, g) per plane in stored order."""

    grids: dict[str, torch.Tensor]
    out_dim: int
    streaming_axis: int = 0

    def streamed_slabs(self, slab: int):
        streaming = next(p for p, (normal, _) in PLANE_AXES.items() if normal == self.streaming_axis and p in self.grids)
        for start in range(0, self.out_dim, slab):
            stop = min(self.out_dim, start + slab)
            yield {**self.grids, streaming: self.grids[streaming][:, start:stop]}, start, stop

    def plane_slabs(self, slab: int):
        for position, plane in enumerate(self.grids):
            for start in range(0, self.out_dim, slab):
                yield position, start, self.grids[plane][:, start : start + slab]


@dataclass
class RecordingOutput:
    """A BlockOutput that keeps each block in a whole array (and how often each voxel was written)."""

    shape: tuple[int, ...]
    unit: tuple[int, ...]
    dtype: str = "float32"
    block_bytes: int = 64 * 2**20
    blocks: list = field(default_factory=list)

    def __post_init__(self):
        self.values = np.zeros(self.shape, dtype="float32")
        self.writes = np.zeros(self.shape, dtype=int)

    def put(self, origin, shape, compute_channels):
        region = tuple(slice(o, o + n) for o, n in zip(origin, shape))
        self.values[region] = compute_channels(0, shape[0]).numpy()
        self.writes[region] += 1
        self.blocks.append((origin, shape))


def random_grids(planes, channels=5, d=12, g=3) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return {p: torch.randn(channels, d, g, g) for p in planes}


def test_shape_chunks_and_bytes():
    assert DENSE.array_shape(384, 128, PLANES, 8) == (384, 128, 128, 128)
    # C = 384 with the default request of 256: the largest divisor of 384 not above it, 192
    assert DENSE.array_chunks((384, 128, 128, 128), DENSE.default_chunks) == (192, 16, 16, 16)
    assert DENSE.array_chunks((32, 12, 12, 12), DENSE.default_chunks) == (32, 12, 12, 12)
    assert DENSE.bytes_needed(384, 128, PLANES, 8, 2) == 384 * 128**3 * 2
    assert DENSE.dimension_names == ("c", "z", "y", "x")


def test_the_array_sits_on_the_voxel_grid():
    grid = VoxelGrid((8.0, 8.0, 8.0), (0.0, 16.0, 32.0), (12, 12, 12))
    attributes = DENSE.array_attributes(grid, PLANES)
    assert attributes["voxel_size"] == [8.0, 8.0, 8.0] and attributes["offset"] == [0.0, 16.0, 32.0]
    assert attributes["axis_names"][0] == "c^"


@pytest.mark.parametrize("planes, unit", [(("xy", "xz", "yz"), (2, 4, 4, 4)), (("xz",), (5, 5, 12, 12)), (("xy", "yz"), (3, 12, 1, 7))])
def test_write_features_fills_every_voxel_once_with_the_definition(planes, unit):
    grids = random_grids(planes)
    streaming_axis = PLANE_AXES["xy" if "xy" in planes else planes[-1]][0]
    out = RecordingOutput((5, 12, 12, 12), unit, block_bytes=5 * 12 * 12 * 4)  # small: several tiles per slab
    DENSE.write_features(WholeTokens(grids, 12, streaming_axis), out)
    assert (out.writes == 1).all()
    for origin, shape in out.blocks:  # every block starts and ends on a write unit (or the array's edge)
        assert all(o % u == 0 and ((o + n) % u == 0 or o + n == s) for o, n, u, s in zip(origin, shape, unit, out.shape))
    np.testing.assert_allclose(out.values, features_from_tokens(grids, 12).numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_read_region_is_the_stored_values_as_float32(tmp_path, zarr_format):
    values = np.random.default_rng(0).standard_normal((6, 8, 8, 8)).astype("float16")
    storage = StorageOptions(zarr_format=zarr_format)
    store = create_array(tmp_path / "features.zarr", values.shape, "float16", (3, 4, 4, 4), storage, ts_context(2), {},
                         DENSE.dimension_names)
    store.write(values).result()
    reopened = open_array(tmp_path / "features.zarr")
    for region in ([(0, 8)] * 3, [(3, 4), (0, 8), (2, 7)], [(7, 8), (1, 2), (0, 1)]):
        got = DENSE.read_region(reopened, PLANES, region)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, values[(slice(None), *itertools.starmap(slice, region))].astype("float32"))
    assert write_unit(values.shape, (3, 4, 4, 4), zarr_format)[0] == 3
