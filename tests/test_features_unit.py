"""Pure functions of feature extraction: interpolation, plane contributions, slab tiling, slicing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dinov3_cache.extraction.features import (
    SPATIAL_LAYOUT,
    emit_slab,
    interpolate_dim,
    interpolation_matrix,
    normalise,
    plane_contribution,
    plane_order,
    plane_slices,
    spatial_layout,
)

CPU = torch.device("cpu")


@pytest.mark.parametrize("in_size, out_size", [(4, 16), (4, 64), (3, 7), (16, 16), (5, 2)])
def test_interpolation_rows_sum_to_one_and_match_torch(in_size, out_size):
    matrix = interpolation_matrix(in_size, out_size, 0, out_size, CPU)
    assert matrix.shape == (out_size, in_size)
    torch.testing.assert_close(matrix.sum(dim=1), torch.ones(out_size))
    assert (matrix >= 0).all() and ((matrix > 0).sum(dim=1) <= 2).all()
    x = torch.randn(1, 1, in_size, in_size)
    expected = F.interpolate(x, size=(out_size, out_size), mode="bilinear", align_corners=False)[0, 0]
    ours = interpolate_dim(interpolate_dim(x[0, 0], 0, matrix), 1, matrix)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)


def test_interpolation_matrix_rows_are_the_full_matrix_rows():
    full = interpolation_matrix(4, 16, 0, 16, CPU)
    torch.testing.assert_close(interpolation_matrix(4, 16, 5, 11, CPU), full[5:11])


@pytest.mark.parametrize("plane", ["xy", "xz", "yz"])
def test_plane_contribution_equals_f_interpolate_per_slice(plane):
    torch.manual_seed(0)
    d, g, c = 8, 2, 3
    grids = torch.randn(d, c, g, g)  # one grid per slice along the plane's normal
    expected = F.interpolate(grids, size=(d, d), mode="bilinear", align_corners=False)  # (slice, c, a, b)
    expected = expected.permute(*SPATIAL_LAYOUT[plane])  # (c, z, y, x)
    whole = plane_contribution(spatial_layout(grids, plane), plane, d, [(0, d)] * 3)
    torch.testing.assert_close(whole, expected, rtol=1e-5, atol=1e-6)
    # a sub-block: the normal axis narrowed in the grids, the image axes by the ranges
    ranges = [(2, 6), (1, 8), (0, 3)]
    normal = {"xy": 0, "xz": 1, "yz": 2}[plane]
    lo, hi = ranges[normal]
    part = plane_contribution(spatial_layout(grids, plane).narrow(1 + normal, lo, hi - lo), plane, d, ranges)
    torch.testing.assert_close(part, expected[:, 2:6, 1:8, 0:3], rtol=1e-5, atol=1e-6)


def test_plane_order_streams_xy_when_present():
    assert plane_order(("xy", "xz", "yz")) == (["xz", "yz"], "xy")
    assert plane_order(("yz", "xz")) == (["yz"], "xz")


def test_emit_slab_blocks_tile_the_slab_exactly(monkeypatch):
    """Every voxel of the slab is handed out once, with the plane average as its value."""
    import dinov3_cache.extraction.features as features

    monkeypatch.setattr(features, "BLOCK_BYTES", 1)  # smallest tiles: many blocks
    torch.manual_seed(0)
    d, g, c = 8, 2, 4
    streaming = spatial_layout(torch.randn(d, c, g, g), "xy")
    held = {"xz": spatial_layout(torch.randn(d, c, g, g), "xz")}
    out = torch.full((c, d, d, d), float("nan"))
    seen = torch.zeros((c, d, d, d), dtype=torch.int32)

    def emit(origin, shape, compute):
        region = tuple(slice(o, o + n) for o, n in zip(origin, shape))
        out[region] = compute(0, shape[0])
        seen[region] += 1

    start, stop = 2, 6
    emit_slab(streaming[:, start:stop], "xy", held, start, stop, 0, d, (2, 2, 2, 2), 4, emit)
    assert (seen[:, start:stop] == 1).all() and (seen[:, :start] == 0).all() and (seen[:, stop:] == 0).all()
    expected = (plane_contribution(streaming, "xy", d, [(0, d)] * 3)
                + plane_contribution(held["xz"], "xz", d, [(0, d)] * 3)) / 2
    torch.testing.assert_close(out[:, start:stop], expected[:, start:stop], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("plane, normal", [("xy", 0), ("xz", 1), ("yz", 2)])
def test_plane_slices_area_average_along_the_normal(plane, normal):
    raw = np.random.default_rng(0).integers(0, 255, size=(8, 8, 8), dtype=np.uint8)
    slices = plane_slices(raw, plane, 4, 1, 3, CPU)
    stack = np.moveaxis(raw.astype(np.float64), normal, 0).reshape(4, 2, 8, 8).mean(axis=1)
    np.testing.assert_allclose(slices.numpy(), stack[1:3], rtol=1e-6)


def test_normalise_maps_the_range_to_unit_then_standardises():
    slices = torch.tensor([[[0.0, 127.5], [255.0, 300.0]]])
    normalization = {"mean": [0.5, 0.25, 0.0], "std": [0.5, 0.25, 1.0]}
    out = normalise(slices, (0.0, 255.0), normalization)
    assert out.shape == (1, 3, 2, 2)
    torch.testing.assert_close(out[0, 0], torch.tensor([[-1.0, 0.0], [1.0, 1.0]]))  # 300 clamps to 1
    torch.testing.assert_close(out[0, 1], torch.tensor([[-1.0, 1.0], [3.0, 3.0]]))
