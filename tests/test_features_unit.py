"""Pure functions of feature extraction: interpolation, features_from_tokens, slab tiling, slicing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dinov3_cache.extraction.features import iter_slabs, normalise, plane_order, plane_slices
from dinov3_cache.storage.upsampling import (
    features_from_tokens,
    interpolate_dim,
    interpolation_matrix,
    rounding_bound,
    token_window,
)

CPU = torch.device("cpu")
# (slice, c, a, b) of a plane's grids -> (c, z, y, x)
SPATIAL_LAYOUT = {"xy": (1, 0, 2, 3), "xz": (1, 2, 0, 3), "yz": (1, 2, 3, 0)}


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


@pytest.mark.parametrize("in_size, out_size", [(4, 16), (32, 128), (3, 7)])
def test_token_window_covers_every_nonzero_weight(in_size, out_size):
    full = interpolation_matrix(in_size, out_size, 0, out_size, CPU)
    for start, stop in [(0, 1), (0, out_size), (out_size // 3, out_size // 2 + 1), (out_size - 1, out_size)]:
        t0, t1 = token_window(in_size, out_size, start, stop)
        rows = full[start:stop]
        assert rows[:, :t0].abs().sum() == 0 and rows[:, t1:].abs().sum() == 0
        assert rows[:, t0].abs().sum() > 0 or t0 == 0


def reference_features(tokens: dict[str, torch.Tensor], d: int) -> torch.Tensor:
    """The formula with torch's own bilinear upsampling: per slice, then the plane mean."""
    parts = []
    for plane, grids in tokens.items():  # (C, n, g, g)
        up = F.interpolate(grids.transpose(0, 1), size=(d, d), mode="bilinear", align_corners=False)
        parts.append(up.permute(*SPATIAL_LAYOUT[plane]))
    return torch.stack(parts).mean(dim=0)


def random_tokens(planes, c: int, d: int, g: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {p: torch.randn(c, d, g, g, generator=generator) for p in planes}


@pytest.mark.parametrize("planes", [("xy",), ("xz",), ("yz",), ("xy", "xz", "yz")])
def test_features_from_tokens_is_the_mean_of_torch_bilinear_upsampling(planes):
    d, g, c = 8, 2, 3
    tokens = random_tokens(planes, c, d, g)
    expected = reference_features(tokens, d)
    torch.testing.assert_close(features_from_tokens(tokens, d), expected, rtol=1e-5, atol=1e-6)


def test_features_from_tokens_of_a_window_equal_that_region_of_the_whole():
    """A crop built from the slices under it and the token windows it reads equals the crop
    of the whole volume's features (what the loader relies on)."""
    d, g, c = 16, 4, 5
    tokens = random_tokens(("xy", "xz", "yz"), c, d, g)
    whole = features_from_tokens(tokens, d)
    region = [(3, 9), (0, 5), (11, 16)]
    axes = {"xy": (0, (1, 2)), "xz": (1, (0, 2)), "yz": (2, (0, 1))}
    windows, origins = {}, {}
    for plane, grids in tokens.items():
        normal, (ia, ib) = axes[plane]
        (a0, a1), (b0, b1) = token_window(g, d, *region[ia]), token_window(g, d, *region[ib])
        windows[plane] = grids[:, region[normal][0] : region[normal][1], a0:a1, b0:b1]
        origins[plane] = (a0, b0)
        assert (a1 - a0) * (b1 - b0) < g * g or plane == "yz"  # a crop reads less than the plane
    part = features_from_tokens(windows, d, region, grid_size=g, origins=origins)
    torch.testing.assert_close(part, whole[:, 3:9, 0:5, 11:16], rtol=1e-5, atol=1e-6)


def test_rounding_bound_holds_for_float16_storage():
    d, g, c = 16, 4, 8
    tokens = random_tokens(("xy", "xz", "yz"), c, d, g)
    dense = features_from_tokens(tokens, d).half().float()
    from_stored = features_from_tokens({p: t.half() for p, t in tokens.items()}, d)
    max_abs = max(float(t.abs().max()) for t in tokens.values())
    difference = float((dense - from_stored).abs().max())
    assert 0 < difference <= rounding_bound(torch.float16, max_abs)


def test_plane_order_streams_xy_when_present():
    assert plane_order(("xy", "xz", "yz")) == (["xz", "yz"], "xy")
    assert plane_order(("yz", "xz")) == (["yz"], "xz")


@pytest.mark.parametrize("batch, slab", [(3, 2), (2, 4), (5, 16), (1, 1)])
def test_iter_slabs_regroups_batches_into_aligned_slabs(batch, slab):
    n = 11
    grids = torch.arange(n, dtype=torch.float32).view(1, n, 1, 1).expand(2, n, 1, 1)
    batches = ((s, grids[:, s : s + batch]) for s in range(0, n, batch))
    slabs = list(iter_slabs(batches, slab, n))
    assert [s for s, _ in slabs] == list(range(0, n, slab))
    torch.testing.assert_close(torch.cat([g for _, g in slabs], dim=1), grids)


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
