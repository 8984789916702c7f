"""The one definition of the features: `features_from_tokens` turns the planes' patch-token
grids into features (C, D, H, W) by bilinear upsampling in each plane and the mean over the
planes. The dense storage form builds every block it writes with it, and the token form builds
the features it delivers with it, so the two forms cannot drift apart. It lives here, beside the
storage forms, so that the extraction and the loader import it from one neutral place.

Token grids are in the stored order of a plane: (C, n, ga, gb), n slices along the plane's
normal, image axes a and b in z, y, x order (xy: z | y, x; xz: y | z, x; yz: x | z, y).

    features[c, z, y, x] = mean over planes p of
        sum_{i, j} W_a[u_a, i] W_b[u_b, j] tokens_p[c, s, i, j]

where s is the voxel's coordinate along p's normal, u_a and u_b its coordinates along p's image
axes, and W (D x g) the matrix of torch's bilinear upsampling (align_corners=False): row u holds
1 - f at floor(t) and f at floor(t) + 1 for t = max((u + 0.5) g / D - 0.5, 0), f = t - floor(t),
indices clamped to g - 1. Every row is non-negative and sums to one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from dinov3_cache.storage.planes import PLANE_AXES


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


def token_window(grid_size: int, out_dim: int, start: int, stop: int) -> tuple[int, int]:
    """The tokens (first, stop) that outputs start:stop along one image axis read."""
    i0, i1, _ = linear_weights(grid_size, out_dim, start, stop, torch.device("cpu"))
    return int(i0[0]), int(i1[-1]) + 1


def interpolate_dim(x: torch.Tensor, dim: int, matrix: torch.Tensor) -> torch.Tensor:
    """Linear interpolation along one dim, as one matrix product (a dense product beats
    gathering the two neighbours on CPUs and GPUs alike); the result is contiguous."""
    if dim == x.dim() - 1:
        return x @ matrix.T
    before, after = x.shape[:dim], x.shape[dim + 1 :]
    out = torch.matmul(matrix, x.reshape(-1, x.shape[dim], math.prod(after)))
    return out.reshape(*before, matrix.shape[0], *after)


def plane_features(
    grids: torch.Tensor, plane: str, out_dim: int, region: Sequence[tuple[int, int]],
    grid_size: int, origin: tuple[int, int] = (0, 0),
) -> torch.Tensor:
    """One plane's upsampled grids over `region`, (C, dz, dy, dx) float32, contiguous. The
    (small) grids are laid out as (C, z, y, x) first, so the products write the output in its
    final order; separable: one image axis at a time, the one with fewer outputs first."""
    normal, image_axes = PLANE_AXES[plane]
    stored = (normal, *image_axes)  # the spatial axis of stored dims 1, 2, 3
    x = grids.float().permute(0, *(1 + stored.index(axis) for axis in range(3)))
    for axis in sorted(image_axes, key=lambda a: region[a][1] - region[a][0]):
        first = origin[image_axes.index(axis)]
        full = interpolation_matrix(grid_size, out_dim, *region[axis], x.device)
        x = interpolate_dim(x, 1 + axis, full[:, first : first + x.shape[1 + axis]])
    return x


def features_from_tokens(
    tokens: Mapping[str, torch.Tensor],
    out_dim: int,
    region: Sequence[tuple[int, int]] | None = None,
    grid_size: int | None = None,
    origins: Mapping[str, tuple[int, int]] | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The features (C, dz, dy, dx), float32, on the tokens' device.

    tokens: plane name -> token grids (C, n, ga, gb) in the stored order, holding the slices
        of `region` along the plane's normal (n = its length) and the tokens from
        origins[plane] (default (0, 0)) on, at least those `token_window` names.
    out_dim: D, the features' edge length.
    region: (start, stop) along z, y, x (default the whole D^3 volume).
    grid_size: g, tokens per image axis of a whole plane (default the grids' own size).
    out: a float32 tensor of the result's shape to fill (e.g. a batch slot), else a new one.
    """
    if not tokens:
        raise ValueError("features_from_tokens needs the token grids of at least one plane")
    region = [tuple(r) for r in region] if region is not None else [(0, out_dim)] * 3
    for i, (plane, grids) in enumerate(tokens.items()):
        g = grid_size if grid_size is not None else grids.shape[-1]
        part = plane_features(grids, plane, out_dim, region, g, (origins or {}).get(plane, (0, 0)))
        if i == 0:
            total = part if out is None else out.copy_(part)
        else:
            total.add_(part)
    return total.div_(len(tokens))


def rounding_bound(stored_dtype: torch.dtype, max_abs_token: float) -> float:
    """Largest difference between features built from stored tokens and stored dense
    features of the same tokens t: |F(r(t)) - r(F(t))| <= |F(r(t) - t)| + |F(t) - r(F(t))|
    <= 2 u max|t|, since F is a convex combination (u: the unit roundoff of the stored
    dtype, 0 for float32), plus float32 arithmetic of differently shaped products."""
    unit_roundoff = 0.0 if stored_dtype == torch.float32 else torch.finfo(stored_dtype).eps / 2
    return (2 * unit_roundoff + 1e-5) * max_abs_token
