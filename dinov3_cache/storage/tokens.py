"""The token form (--layout tokens): the planes' patch-token grids (P, C, D, g, g) in
`volume_XXXXXX_tokens.zarr`, about 5x fewer bytes than dense at the seed geometry. A read
fetches only the token windows a region depends on, and its features are built with
`features_from_tokens`, the definition the dense form writes with, so both forms deliver the
same tensors.

The loader builds a crop's features where the batch goes (loader/tokens.py): on the CPU when
the batch is converted on the host, on the GPU otherwise (the tokens travel, a fraction of the
features' bytes, and the features are made there).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from dinov3_cache.storage.base import BlockOutput, CropTokens, FeatureStorage, register_storage
from dinov3_cache.storage.planes import PLANE_AXES
from dinov3_cache.zarr_arrays import feature_chunks

if TYPE_CHECKING:
    import torch

    from dinov3_cache.geometry import VoxelGrid
    from dinov3_cache.schema import VolumeMetadata

BUILD_BYTES = 128 * 2**20  # float32 temporaries per plane while building a crop's features
# A crop's token windows are carved from one buffer of a whole number of these, so that the
# loader's batch buffers find a free one of the same size to reuse whatever the crop's windows
# (fresh memory costs a page fault per 4 KiB: 5 of the 21 ms of reading a C = 256, 64^3 crop).
WINDOWS_STEP = 1 << 20
WINDOW_ALIGN = 64  # bytes: each window starts on a cache line


def carve_windows(shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, allocate=None) -> dict[str, torch.Tensor]:
    """Tensors of `shapes` (plane -> shape) in `dtype`, contiguous, views of one uint8 buffer
    from allocate(shape, dtype) (default torch.empty)."""
    import torch

    sizes = {plane: math.prod(shape) * dtype.itemsize for plane, shape in shapes.items()}
    starts, total = {}, 0
    for plane, size in sizes.items():
        starts[plane], total = total, total + -(-size // WINDOW_ALIGN) * WINDOW_ALIGN
    nbytes = -(-total // WINDOWS_STEP) * WINDOWS_STEP
    flat = allocate((nbytes,), torch.uint8) if allocate is not None else torch.empty(nbytes, dtype=torch.uint8)
    return {plane: flat[starts[plane] : starts[plane] + sizes[plane]].view(dtype).view(shapes[plane]) for plane in shapes}


class TokenStorage(FeatureStorage):
    name = "tokens"
    description = "the planes' patch-token grids, about 5x smaller; the loader builds the same features from them"
    array_name = "tokens"
    # (channels, slice, a, b) of each plane's grids: a 64^3 crop of a 128^3 volume from 32^2
    # grids reads about a third of each plane's chunks; 128-256 KiB chunks at the seed geometry
    default_chunks = (128, 16, 8, 8)
    chunk_axes = "C,SLICE,A,B"
    dimension_names = ("plane", "c", "slice", "a", "b")
    builds_features = True

    def array_shape(self, channels: int, out_dim: int, planes: Sequence[str], grid_size: int) -> tuple[int, ...]:
        return (len(planes), channels, out_dim, grid_size, grid_size)

    def array_chunks(self, shape: Sequence[int], requested: Sequence[int]) -> tuple[int, ...]:
        return (1, *feature_chunks(shape[1:], requested))  # one plane per chunk

    def array_attributes(self, grid: VoxelGrid, planes: Sequence[str]) -> dict:
        # the token grids do not sit on the voxel grid: they carry their planes instead
        return {"dinov3_cache": {"planes": list(planes)}}

    def write_features(self, tokens: CropTokens, output: BlockOutput) -> None:
        """Every plane slab by slab, one block per slab with all channels: the grids as they come."""
        for position, start, grids in tokens.plane_slabs(output.unit[2]):
            output.put((position, 0, start, 0, 0), (1, *grids.shape), lambda lo, hi, g=grids: g.unsqueeze(0))

    def read_region(self, store, planes: Sequence[str], region: Sequence[tuple[int, int]]) -> np.ndarray:
        import torch

        from dinov3_cache.storage.upsampling import features_from_tokens, token_window

        _, _, out_dim, grid_size, _ = store.shape
        grids, origins = {}, {}
        for position, plane in enumerate(planes):
            normal, image_axes = PLANE_AXES[plane]
            (a0, a1), (b0, b1) = (token_window(grid_size, out_dim, *region[axis]) for axis in image_axes)
            n0, n1 = region[normal]
            window = store[position, :, n0:n1, a0:a1, b0:b1].read().result().astype("float32")
            grids[plane], origins[plane] = torch.from_numpy(window), (a0, b0)
        return features_from_tokens(grids, out_dim, region, grid_size, origins).numpy()

    def start_read(self, reader, spatial: Sequence[slice], out=None, allocate=None) -> tuple[TokenCrop, list]:
        """For every plane, the slices of the crop along its normal and the tokens its
        interpolation reads along the image axes; along b (the last axis) rounded out to whole
        chunks, so that each chunk's rows land whole and aligned (chunk_copy.py copies them 16
        bytes at a time, twice as fast as token by token; the build reads the tokens it needs).
        The windows are carved from one buffer from `allocate` (`carve_windows`)."""
        from dinov3_cache.storage.dtypes import torch_dtype
        from dinov3_cache.storage.upsampling import token_window

        volume = reader.volume
        _, channels, out_dim, grid_size, _ = reader.shape(self.array_name)
        chunk_b = reader.chunks(self.array_name)[-1]
        region = tuple((s.start, s.stop) for s in spatial)
        reads, shapes, cuts, origins = {}, {}, {}, {}
        for position, plane in enumerate(volume.metadata.configuration.planes):
            normal, image_axes = PLANE_AXES[plane]
            (a0, a1), (b0, b1) = (token_window(grid_size, out_dim, *region[axis]) for axis in image_axes)
            r0, r1 = b0 // chunk_b * chunk_b, min(grid_size, -(-b1 // chunk_b) * chunk_b)
            n0, n1 = region[normal]
            reads[plane] = (slice(position, position + 1), slice(0, channels), slice(n0, n1), slice(a0, a1), slice(r0, r1))
            shapes[plane] = (channels, n1 - n0, a1 - a0, r1 - r0)
            cuts[plane], origins[plane] = slice(b0 - r0, b1 - r0), (a0, b0)
        windows = carve_windows(shapes, torch_dtype(volume.metadata.dtypes[self.array_name]), allocate)
        pending = [reader.start_region(self.array_name, reads[plane], window[None]) for plane, window in windows.items()]
        return TokenCrop(windows, cuts, origins, region, out_dim, grid_size), pending

    def volume_problems(self, metadata: VolumeMetadata) -> list[str]:
        problems = super().volume_problems(metadata)
        if problems or "features" not in metadata.shapes:
            return problems
        channels, out_dim = metadata.shapes["features"][:2]
        stored = list(metadata.shapes[self.array_name])
        planes = metadata.configuration.planes or ()
        if len(stored) != 5 or stored[:3] != [len(planes), channels, out_dim] or stored[3] != stored[4]:
            problems.append(f"the '{self.array_name}' shape {stored} does not hold (planes {len(planes)}, C {channels}, "
                            f"D {out_dim}, g, g) of the features {list(metadata.shapes['features'])}")
        return problems

    def attribute_problems(self, attributes: dict, metadata: VolumeMetadata) -> list[str]:
        recorded = (attributes.get("dinov3_cache") or {}).get("planes")
        planes = list(metadata.configuration.planes or ())
        if recorded != planes:
            return [f"the array's planes attribute {recorded} differs from the metadata's {planes}"]
        return []


@dataclass
class TokenCrop:
    """The token windows of one crop of a tokens volume, and how to build its features."""

    windows: dict[str, torch.Tensor]  # plane -> the tokens read (C, n, wa, wb') in the stored dtype
    cuts: dict[str, slice]  # plane -> the grids' tokens along b within the window (start_read)
    origins: dict[str, tuple[int, int]]  # plane -> first token of the grids along a, b
    region: tuple[tuple[int, int], ...]  # the crop: (start, stop) along z, y, x
    out_dim: int
    grid_size: int

    @property
    def grids(self) -> dict[str, torch.Tensor]:
        """plane -> (C, n, wa, wb): the tokens the crop's interpolation reads (views of the windows)."""
        return {plane: window[..., self.cuts[plane]] for plane, window in self.windows.items()}

    @property
    def shape(self) -> tuple[int, ...]:
        channels = next(iter(self.windows.values())).shape[0]
        return (channels, *(hi - lo for lo, hi in self.region))

    @property
    def stored_dtype(self) -> torch.dtype:
        return next(iter(self.windows.values())).dtype

    def features(self, device: torch.device | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """The crop's features (C, dz, dy, dx), built on `device` (default: where the tokens
        are) in float32, into `out` when given (float32 is filled in place, another dtype
        receives a copy), a channel group at a time: the float32 temporaries stay within
        BUILD_BYTES per plane whatever the crop."""
        import torch

        from dinov3_cache.storage.token_kernel import fast_features_from_tokens
        from dinov3_cache.storage.upsampling import features_from_tokens

        if out is None:
            out = torch.empty(self.shape, dtype=torch.float32, device=device)
        if out.device.type == "cpu":  # the tiled kernel: the same values, bounded memory, any out dtype
            return fast_features_from_tokens(self.grids, self.out_dim, self.region, self.grid_size, self.origins, out=out)
        channels, voxels = self.shape[0], math.prod(self.shape[1:])
        group = max(1, BUILD_BYTES // (4 * voxels))
        for c0 in range(0, channels, group):
            grids = {  # the windows travel as they are (one contiguous copy each), the grids are cut there
                p: w[c0 : c0 + group].to(device or w.device, non_blocking=True)[..., self.cuts[p]] for p, w in self.windows.items()
            }
            target = out[c0 : c0 + group]
            if target.dtype == torch.float32:
                features_from_tokens(grids, self.out_dim, self.region, self.grid_size, self.origins, out=target)
            else:
                target.copy_(features_from_tokens(grids, self.out_dim, self.region, self.grid_size, self.origins))
        return out


TOKENS = register_storage(TokenStorage())
