"""The loader's tiled kernel against the one definition, features_from_tokens: whole volumes,
crops at every offset class, 1, 2 and 3 planes, odd sizes, tiles that split channels and slabs."""

from __future__ import annotations

import pytest
import torch

from dinov3_cache.extraction.config import PLANE_AXES
from dinov3_cache.storage import token_kernel
from dinov3_cache.storage.token_kernel import fast_features_from_tokens
from dinov3_cache.storage.upsampling import features_from_tokens, token_window

PLANE_SETS = (("xy",), ("xz",), ("yz",), ("xy", "yz"), ("xz", "yz"), ("xy", "xz", "yz"))


def volume_tokens(planes, channels: int, out_dim: int, grid_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Whole-volume token grids (C, D, g, g) per plane, float16 as stored."""
    generator = torch.Generator().manual_seed(seed)
    return {p: torch.randn(channels, out_dim, grid_size, grid_size, generator=generator).half() for p in planes}


def crop_tokens(tokens, out_dim: int, grid_size: int, region):
    """What the loader reads for a crop: the region's slices along each plane's normal and the
    token windows of its image axes (as TokenStorage.start_read in storage/tokens.py)."""
    grids, origins = {}, {}
    for plane, whole in tokens.items():
        normal, image_axes = PLANE_AXES[plane]
        (a0, a1), (b0, b1) = (token_window(grid_size, out_dim, *region[axis]) for axis in image_axes)
        grids[plane] = whole[:, region[normal][0] : region[normal][1], a0:a1, b0:b1]
        origins[plane] = (a0, b0)
    return grids, origins


def assert_same(fast: torch.Tensor, reference: torch.Tensor) -> None:
    assert fast.shape == reference.shape
    bound = 1e-5 * max(1.0, reference.abs().max().item())  # float32 rounding of differently ordered sums
    assert (fast.float() - reference).abs().max().item() <= bound


@pytest.fixture(params=[1, 2], ids=["1 thread", "2 threads"])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    assert torch.get_num_threads() == request.param  # the kernel restores the thread count
    torch.set_num_threads(before)


@pytest.fixture(params=[token_kernel.TILE_BYTES, 4096], ids=["default tiles", "tiny tiles"])
def tile_bytes(request, monkeypatch):
    """Tiny tiles split both the channels and the slices into many tiles."""
    monkeypatch.setattr(token_kernel, "TILE_BYTES", request.param)
    return request.param


@pytest.mark.parametrize("planes", PLANE_SETS, ids="+".join)
@pytest.mark.parametrize(("channels", "out_dim", "grid_size"), [(8, 32, 2), (5, 21, 3), (3, 17, 5)])
def test_whole_volume_matches_definition(planes, channels, out_dim, grid_size, threads, tile_bytes):
    tokens = volume_tokens(planes, channels, out_dim, grid_size)
    assert_same(fast_features_from_tokens(tokens, out_dim), features_from_tokens(tokens, out_dim))


# (start, stop) per axis for a volume of D = 32, g = 4 (token size 8): aligned to the tokens,
# straddling token boundaries, at the volume's edges, and odd-sized.
CROPS = {
    "aligned": ((0, 16), (8, 24), (16, 32)),
    "straddling": ((3, 19), (5, 21), (11, 27)),
    "edge": ((16, 32), (0, 16), (19, 32)),
    "odd sizes": ((1, 8), (13, 32), (7, 8)),
    "one voxel": ((31, 32), (0, 1), (15, 16)),
}


@pytest.mark.parametrize("planes", PLANE_SETS, ids="+".join)
@pytest.mark.parametrize("name", list(CROPS))
def test_crop_matches_definition(planes, name, threads, tile_bytes):
    out_dim, grid_size, region = 32, 4, CROPS[name]
    tokens = volume_tokens(planes, 6, out_dim, grid_size, seed=1)
    grids, origins = crop_tokens(tokens, out_dim, grid_size, region)
    reference = features_from_tokens(grids, out_dim, region, grid_size, origins)
    assert_same(fast_features_from_tokens(grids, out_dim, region, grid_size, origins), reference)
    # and the crop equals the same region of the whole volume's features
    whole = features_from_tokens(tokens, out_dim)
    assert_same(reference, whole[(slice(None), *(slice(lo, hi) for lo, hi in region))])


def test_planes_with_different_token_windows_along_x_match_definition(threads, tile_bytes):
    """xy and xz share their last product over x only when they hold the same tokens along x;
    a wider xz window (more tokens than the crop reads) takes its own product."""
    out_dim, grid_size, region = 32, 8, [(5, 21), (3, 19), (9, 25)]
    tokens = volume_tokens(("xy", "xz", "yz"), 5, out_dim, grid_size, seed=2)
    grids, origins = crop_tokens(tokens, out_dim, grid_size, region)
    (z0, z1), (b0, b1) = token_window(grid_size, out_dim, *region[0]), token_window(grid_size, out_dim, *region[2])
    grids["xz"] = tokens["xz"][:, region[1][0] : region[1][1], z0:z1, b0 - 1 : b1 + 1]
    origins["xz"] = (z0, b0 - 1)
    reference = features_from_tokens(grids, out_dim, region, grid_size, origins)
    assert_same(fast_features_from_tokens(grids, out_dim, region, grid_size, origins), reference)
    whole = features_from_tokens(tokens, out_dim)
    assert_same(reference, whole[(slice(None), *(slice(lo, hi) for lo, hi in region))])


def test_fills_out_of_another_dtype_and_a_batch_slot(tile_bytes):
    tokens = volume_tokens(("xy", "xz", "yz"), 4, 24, 3)
    batch = torch.full((2, 4, 24, 24, 24), float("nan"), dtype=torch.float16)
    result = fast_features_from_tokens(tokens, 24, out=batch[1])
    assert result.data_ptr() == batch[1].data_ptr()
    assert torch.isnan(batch[0]).all()  # the neighbouring slot is untouched
    reference = features_from_tokens(tokens, 24)
    # float16 rounding of the float32 result (half an ulp) on top of float32 rounding
    bound = (torch.finfo(torch.float16).eps / 2 + 1e-5) * reference.abs().max().item()
    assert (batch[1].float() - reference).abs().max().item() <= bound


@pytest.mark.parametrize("name", ["straddling", "at the edge"])
def test_grids_cut_from_wider_windows_match_definition(name, threads):
    """The loader reads token windows rounded out to whole chunks along b and hands the kernel
    the grids cut from them (views whose rows are not contiguous)."""
    tokens = volume_tokens(("xy", "xz", "yz"), 6, 40, 5)
    region = {"straddling": ((3, 30), (11, 29), (9, 27)), "at the edge": ((30, 40), (0, 40), (21, 40))}[name]
    grids, origins = crop_tokens(tokens, 40, 5, region)
    cut = {}
    for plane, exact in grids.items():
        b0, width = origins[plane][1], exact.shape[-1]
        r0, r1 = max(0, b0 - 1), min(5, b0 + width + 1)  # one token more on each side where there is one
        normal, (a_axis, _) = PLANE_AXES[plane]
        a0 = origins[plane][0]
        window = tokens[plane][:, slice(*region[normal]), a0 : a0 + exact.shape[2], r0:r1].clone()
        cut[plane] = window[..., b0 - r0 : b0 - r0 + width]
        assert torch.equal(cut[plane], exact)
    assert not all(g.is_contiguous() for g in cut.values())
    assert_same(fast_features_from_tokens(cut, 40, region, 5, origins), features_from_tokens(grids, 40, region, 5, origins))


def test_memory_reused_from_earlier_builds_never_leaks_into_a_result():
    """Operand and layout buffers are lent from earlier builds (token_kernel.MEMORY) with their
    old contents: every element a build reads it wrote first."""
    with token_kernel.MEMORY.lock:
        token_kernel.MEMORY.free = [torch.full((n,), float("nan")) for n in (1 << 16, 1 << 20, 1 << 22)]
    tokens = volume_tokens(("xy", "xz", "yz"), 5, 24, 3)
    for region in (((0, 24),) * 3, ((3, 17), (5, 24), (0, 9))):
        grids, origins = crop_tokens(tokens, 24, 3, region)
        assert_same(fast_features_from_tokens(grids, 24, region, 3, origins), features_from_tokens(grids, 24, region, 3, origins))
    assert len(token_kernel.MEMORY.free) <= token_kernel.MEMORY.keep


def test_nan_in_out_is_ignored():
    """The first plane overwrites the (reused) tile: stale values never leak into the result."""
    tokens = volume_tokens(("xy",), 2, 16, 2)
    out = torch.full((2, 16, 16, 16), float("nan"))
    assert torch.isfinite(fast_features_from_tokens(tokens, 16, out=out)).all()


def test_no_planes_is_an_error():
    with pytest.raises(ValueError, match="at least one plane"):
        fast_features_from_tokens({}, 16)
