"""Token volumes (extracted with --layout tokens) in the loader: a crop reads only the token
windows its features depend on, and its features are built with `features_from_tokens`, the
definition the dense writer uses, so both layouts deliver the same tensors.

Where the features are built follows the batch: on the CPU when the batch is converted on the
host (the default, and every loader without device='cuda'), on the GPU otherwise: the tokens
travel (a fraction of the features' bytes) and the features are made there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dinov3_cache.extraction.config import PLANE_AXES
from dinov3_cache.extraction.upsampling import features_from_tokens, token_window
from dinov3_cache.layout import feature_array_name
from dinov3_cache.loader.reader import Read, VolumeReader, torch_dtype
from dinov3_cache.loader.token_kernel import fast_features_from_tokens
from dinov3_cache.loader.volumes import CachedVolume

BUILD_BYTES = 128 * 2**20  # float32 temporaries per plane while building a crop's features


def stored_feature_array(volume: CachedVolume) -> str:
    """The array holding a volume's features: 'features' (dense) or 'tokens'."""
    return feature_array_name(volume.metadata.layout)


@dataclass
class TokenCrop:
    """The token windows of one crop of a tokens volume, and how to build its features."""

    grids: dict[str, torch.Tensor]  # plane -> (C, n, wa, wb) in the stored dtype
    origins: dict[str, tuple[int, int]]  # plane -> first token along a, b
    region: tuple[tuple[int, int], ...]  # the crop: (start, stop) along z, y, x
    out_dim: int
    grid_size: int

    @property
    def shape(self) -> tuple[int, ...]:
        channels = next(iter(self.grids.values())).shape[0]
        return (channels, *(hi - lo for lo, hi in self.region))

    @property
    def stored_dtype(self) -> torch.dtype:
        return next(iter(self.grids.values())).dtype

    def features(self, device: torch.device | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """The crop's features (C, dz, dy, dx), built on `device` (default: where the tokens
        are) in float32, into `out` when given (float32 is filled in place, another dtype
        receives a copy), a channel group at a time: the float32 temporaries stay within
        BUILD_BYTES per plane whatever the crop."""
        if out is None:
            out = torch.empty(self.shape, dtype=torch.float32, device=device)
        if out.device.type == "cpu":  # the tiled kernel: same values, bounded memory, any out dtype
            return fast_features_from_tokens(self.grids, self.out_dim, self.region, self.grid_size, self.origins, out=out)
        channels, voxels = self.shape[0], math.prod(self.shape[1:])
        group = max(1, BUILD_BYTES // (4 * voxels))
        for c0 in range(0, channels, group):
            grids = {p: g[c0 : c0 + group].to(device or g.device, non_blocking=True) for p, g in self.grids.items()}
            target = out[c0 : c0 + group]
            if target.dtype == torch.float32:
                features_from_tokens(grids, self.out_dim, self.region, self.grid_size, self.origins, out=target)
            else:
                target.copy_(features_from_tokens(grids, self.out_dim, self.region, self.grid_size, self.origins))
        return out


def start_token_read(reader: VolumeReader, spatial: Sequence[slice]) -> tuple[TokenCrop, list[Read]]:
    """Start reading, for every plane, the slices of the crop along its normal and the tokens
    its interpolation reads along the image axes; finish with reader.finish(pending)."""
    volume = reader.volume
    _, channels, out_dim, grid_size, _ = reader.shape("tokens")
    dtype = torch_dtype(volume.metadata.dtypes["tokens"])
    region = tuple((s.start, s.stop) for s in spatial)
    grids, origins, pending = {}, {}, []
    for position, plane in enumerate(volume.metadata.configuration.planes):
        normal, image_axes = PLANE_AXES[plane]
        (a0, a1), (b0, b1) = (token_window(grid_size, out_dim, *region[axis]) for axis in image_axes)
        n0, n1 = region[normal]
        out = torch.empty((1, channels, n1 - n0, a1 - a0, b1 - b0), dtype=dtype)
        window = (slice(position, position + 1), slice(0, channels), slice(n0, n1), slice(a0, a1), slice(b0, b1))
        pending.append(reader.start_region("tokens", window, out))
        grids[plane], origins[plane] = out[0], (a0, b0)
    return TokenCrop(grids, origins, region, out_dim, grid_size), pending


def fill_token_features(
    features: torch.Tensor | None,
    crops: Sequence[TokenCrop | None],
    device: torch.device | None,
    dtype: torch.dtype | None,
) -> torch.Tensor:
    """The batch's features with every token crop built on `device` (None: the CPU). `features`
    holds the dense items (None when every item is a token crop); dtype: the batch's (None:
    the stored dtype)."""
    first = next(c for c in crops if c is not None)
    if features is None:
        features = torch.empty((len(crops), *first.shape), dtype=dtype or first.stored_dtype, device=device)
    elif dtype is not None:
        features = features.to(dtype)
    for b, crop in enumerate(crops):
        if crop is not None:
            crop.features(device, out=features[b])
    return features
