"""dinov3_cache/storage/tokens.py: the token form's array, its writing, its reads and its checks."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dinov3_cache.geometry import VoxelGrid
from dinov3_cache.storage import storage_for
from dinov3_cache.storage.planes import PLANES
from dinov3_cache.storage.upsampling import features_from_tokens
from dinov3_cache.zarr_arrays import StorageOptions, create_array, open_array, ts_context
from tests.test_storage_dense import RecordingOutput, WholeTokens, random_grids

TOKENS = storage_for("tokens")


def test_shape_chunks_and_bytes():
    assert TOKENS.array_shape(384, 128, PLANES, 8) == (3, 384, 128, 8, 8)
    # one plane per chunk; C = 384 with the default request of 128: 128 divides it
    assert TOKENS.array_chunks((3, 384, 128, 8, 8), TOKENS.default_chunks) == (1, 128, 16, 8, 8)
    assert TOKENS.array_chunks((2, 32, 16, 4, 4), (16, 4, 2, 2)) == (1, 16, 4, 2, 2)
    assert TOKENS.bytes_needed(1024, 128, PLANES, 32, 2) == 3 * 1024 * 128 * 32 * 32 * 2
    # 5.33x fewer bytes than dense at the seed geometry (C = 1024, D = 128, g = 32, three planes)
    dense = storage_for("dense").bytes_needed(1024, 128, PLANES, 32, 2)
    assert dense / TOKENS.bytes_needed(1024, 128, PLANES, 32, 2) == pytest.approx(16 / 3)


def test_the_array_carries_its_planes_not_a_voxel_grid():
    grid = VoxelGrid((8.0, 8.0, 8.0), (0.0, 0.0, 0.0), (12, 12, 12))
    assert TOKENS.array_attributes(grid, ("xz", "xy")) == {"dinov3_cache": {"planes": ["xz", "xy"]}}
    assert TOKENS.builds_features and TOKENS.dimension_names == ("plane", "c", "slice", "a", "b")


def test_write_features_stores_the_grids_as_they_come():
    grids = random_grids(("xz", "yz"), channels=4, d=10, g=3)
    out = RecordingOutput((2, 4, 10, 3, 3), (1, 4, 4, 3, 3))
    TOKENS.write_features(WholeTokens(grids, 10), out)
    assert (out.writes == 1).all()
    np.testing.assert_array_equal(out.values, torch.stack([grids["xz"], grids["yz"]]).numpy())


@pytest.mark.parametrize("region", [[(0, 10)] * 3, [(4, 5), (0, 10), (0, 10)], [(2, 7), (9, 10), (3, 6)]])
def test_read_region_builds_the_features_of_the_region(tmp_path, region):
    planes = ("xy", "xz", "yz")
    grids = random_grids(planes, channels=4, d=10, g=3)
    values = torch.stack([grids[p] for p in planes]).numpy()
    store = create_array(tmp_path / "tokens.zarr", values.shape, "float32", (1, 2, 4, 3, 3), StorageOptions(), ts_context(2), {},
                         TOKENS.dimension_names)
    store.write(values).result()
    got = TOKENS.read_region(open_array(tmp_path / "tokens.zarr"), planes, region)
    whole = features_from_tokens(grids, 10).numpy()
    np.testing.assert_allclose(got, whole[(slice(None), *(slice(lo, hi) for lo, hi in region))], rtol=1e-5, atol=1e-6)


def metadata(tokens_shape, planes=("xy", "xz", "yz")):
    return SimpleNamespace(
        dtypes={"tokens": "float16", "gt": "uint8"}, shapes={"features": [32, 16, 16, 16], "tokens": tokens_shape},
        configuration=SimpleNamespace(planes=planes),
    )


def test_verification_checks_the_tokens_against_the_features_they_deliver():
    assert TOKENS.volume_problems(metadata([3, 32, 16, 4, 4])) == []
    assert "does not hold" in TOKENS.volume_problems(metadata([2, 32, 16, 4, 4]))[0]  # a plane short
    assert "does not hold" in TOKENS.volume_problems(metadata([3, 32, 16, 4, 5]))[0]
    lacking = metadata([3, 32, 16, 4, 4])
    del lacking.dtypes["tokens"]
    assert TOKENS.volume_problems(lacking) == ["stored as 'tokens' but the metadata lists no 'tokens' array"]
    assert TOKENS.attribute_problems({"dinov3_cache": {"planes": ["xy", "xz", "yz"]}}, metadata([3, 32, 16, 4, 4])) == []
    problems = TOKENS.attribute_problems({"dinov3_cache": {"planes": ["xy"]}}, metadata([3, 32, 16, 4, 4]))
    assert problems and "planes attribute ['xy']" in problems[0]
