"""Geometry, defined once: the crop a volume covers (`CropGeometry`, from the resolution
options) and the voxel grid of a stored array in world coordinates (`VoxelGrid`).

World coordinates are nanometres in (z, y, x) order. An array's `offset_nm` is the world
position of the corner of its first voxel (funlib.persistence's convention), so voxel i
covers [offset + i * voxel_size, offset + (i + 1) * voxel_size) along each axis.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from dinov3_cache.errors import UsageError

SPATIAL_AXES = ("z", "y", "x")
CHANNEL_AXIS = "c"
UNIT = "nm"


@dataclass(frozen=True)
class CropGeometry:
    """Crop size in world units: labels at base_resolution nm, raw at min_resolution_for_raw nm."""

    base_resolution: float = 128.0
    min_resolution_for_raw: float = 32.0
    output_image_dim: int = 128

    def __post_init__(self) -> None:
        if self.output_image_dim <= 0:
            raise UsageError(f"--output-image-dim must be positive, got {self.output_image_dim}")
        if self.min_resolution_for_raw <= 0 or self.base_resolution <= 0:
            raise UsageError("--base-resolution and --min-resolution-for-raw must be positive")
        ratio = self.base_resolution / self.min_resolution_for_raw
        if ratio < 1 or abs(ratio - round(ratio)) > 1e-9:
            raise UsageError(
                f"--base-resolution ({self.base_resolution:g}) must be a whole multiple of "
                f"--min-resolution-for-raw ({self.min_resolution_for_raw:g})"
            )

    @property
    def raw_per_label(self) -> int:
        """Raw voxels per label voxel along each axis."""
        return int(round(self.base_resolution / self.min_resolution_for_raw))

    @property
    def slice_size(self) -> int:
        return self.output_image_dim * self.raw_per_label

    @property
    def extent_nm(self) -> float:
        return self.output_image_dim * self.base_resolution

    def feature_shape(self, channels: int) -> tuple[int, int, int, int]:
        """(C, D, D, D): a volume's features, as the dense layout stores them and every layout delivers."""
        d = self.output_image_dim
        return (channels, d, d, d)

    def label_grid(self, offset_nm: Sequence[float]) -> VoxelGrid:
        """The grid of features, gt and mask for a crop whose corner is at offset_nm."""
        return VoxelGrid.cube(self.base_resolution, offset_nm, self.output_image_dim)

    def raw_grid(self, offset_nm: Sequence[float]) -> VoxelGrid:
        """The grid of the raw crop (slice resolution), same corner."""
        return VoxelGrid.cube(self.min_resolution_for_raw, offset_nm, self.slice_size)


@dataclass(frozen=True)
class VoxelGrid:
    """A spatial voxel grid in world coordinates: voxel size and corner offset (nm, z y x)
    and shape. Arrays with a channel axis put it first; the grid describes the rest."""

    voxel_size_nm: tuple[float, float, float]
    offset_nm: tuple[float, float, float]
    shape: tuple[int, int, int]

    def __post_init__(self) -> None:
        for name in ("voxel_size_nm", "offset_nm", "shape"):
            if len(getattr(self, name)) != len(SPATIAL_AXES):
                raise ValueError(f"VoxelGrid.{name} needs {len(SPATIAL_AXES)} values, got {getattr(self, name)}")
        object.__setattr__(self, "voxel_size_nm", tuple(float(v) for v in self.voxel_size_nm))
        object.__setattr__(self, "offset_nm", tuple(float(v) for v in self.offset_nm))
        object.__setattr__(self, "shape", tuple(int(v) for v in self.shape))

    @classmethod
    def cube(cls, voxel_nm: float, offset_nm: Sequence[float], size: int) -> VoxelGrid:
        return cls((voxel_nm,) * 3, tuple(offset_nm), (size,) * 3)

    @property
    def extent_nm(self) -> tuple[float, ...]:
        return tuple(v * n for v, n in zip(self.voxel_size_nm, self.shape))

    @property
    def end_nm(self) -> tuple[float, ...]:
        return tuple(o + e for o, e in zip(self.offset_nm, self.extent_nm))

    def voxel_centre_nm(self, index: Sequence[int]) -> tuple[float, ...]:
        """World position of the centre of voxel `index` (OME-NGFF places voxels by centres)."""
        return tuple(o + (i + 0.5) * v for o, i, v in zip(self.offset_nm, index, self.voxel_size_nm))

    def axis_names(self, channel_axis: bool) -> list[str]:
        return ([CHANNEL_AXIS] if channel_axis else []) + list(SPATIAL_AXES)

    def array_attributes(self, channel_axis: bool) -> dict:
        """Attributes that place the array in world space for funlib.persistence, zarr-python
        and xarray readers: voxel_size, offset, axis_names, units and axis types. `types` is
        funlib.persistence >= 0.7's axis typing; the `c^` name stays for older readers.
        `_ARRAY_DIMENSIONS` names the axes for xarray and neuroglancer (zarr v2; v3 arrays
        carry `dimension_names` in their metadata)."""
        return {
            "voxel_size": list(self.voxel_size_nm),
            "offset": list(self.offset_nm),
            "axis_names": (["c^"] if channel_axis else []) + list(SPATIAL_AXES),
            "units": [UNIT] * len(SPATIAL_AXES),
            "types": (["channel"] if channel_axis else []) + ["space"] * len(SPATIAL_AXES),
            "_ARRAY_DIMENSIONS": self.axis_names(channel_axis),
        }

    def to_record(self) -> dict:
        return {"voxel_size_nm": list(self.voxel_size_nm), "offset_nm": list(self.offset_nm), "shape": list(self.shape)}

    @classmethod
    def from_record(cls, record: dict) -> VoxelGrid:
        return cls(tuple(record["voxel_size_nm"]), tuple(record["offset_nm"]), tuple(record["shape"]))


@dataclass(frozen=True)
class AxisTransform:
    """Where a stored cube's voxels sit relative to its grid: the stored array is
    flip(transpose(unmoved, axis_order), axes with flip true). Identity for an unaugmented
    crop. A transpose or flip keeps a cube's bounding box, so the grid's offset stays true
    for the box; this says which world voxel each stored index shows."""

    axis_order: tuple[int, int, int] = (0, 1, 2)
    flip: tuple[bool, bool, bool] = (False, False, False)

    RULE = "stored = flip(transpose(unmoved, axis_order), axes where flip); affine_nm maps stored (z, y, x, 1) to the world nm of that voxel's centre"

    def __post_init__(self) -> None:
        if sorted(self.axis_order) != [0, 1, 2] or len(self.flip) != 3:
            raise ValueError(f"AxisTransform needs a permutation of 0, 1, 2 and 3 flips, got {self.axis_order}, {self.flip}")
        object.__setattr__(self, "axis_order", tuple(int(a) for a in self.axis_order))
        object.__setattr__(self, "flip", tuple(bool(f) for f in self.flip))

    def apply(self, unmoved: np.ndarray) -> np.ndarray:
        """The stored array for an unmoved (z, y, x) one."""
        moved = np.transpose(unmoved, self.axis_order)
        flipped = [a for a, f in enumerate(self.flip) if f]
        return np.ascontiguousarray(np.flip(moved, flipped) if flipped else moved)

    def undo(self, stored: np.ndarray) -> np.ndarray:
        """The unmoved array for a stored one: each voxel back at its grid position."""
        flipped = [a for a, f in enumerate(self.flip) if f]
        unflipped = np.flip(stored, flipped) if flipped else stored
        return np.ascontiguousarray(np.transpose(unflipped, np.argsort(self.axis_order)))

    def affine_nm(self, grid: VoxelGrid) -> list[list[float]]:
        """4x4 matrix: stored voxel index (z, y, x, 1) -> world nm (z, y, x, 1) of its centre."""
        matrix = [[0.0] * 4 for _ in range(3)] + [[0.0, 0.0, 0.0, 1.0]]
        for stored_axis, world_axis in enumerate(self.axis_order):
            size, n = grid.voxel_size_nm[world_axis], grid.shape[world_axis]
            flipped = self.flip[stored_axis]
            matrix[world_axis][stored_axis] = -size if flipped else size
            matrix[world_axis][3] = grid.offset_nm[world_axis] + size * (0.5 + (n - 1 if flipped else 0))
        return matrix

    def to_record(self, grids: dict[str, VoxelGrid]) -> dict:
        return {
            "axis_order": list(self.axis_order),
            "flip": list(self.flip),
            "rule": self.RULE,
            "affine_nm": {name: self.affine_nm(grid) for name, grid in grids.items()},
        }

    @classmethod
    def from_record(cls, record: dict | None) -> AxisTransform:
        return cls() if record is None else cls(tuple(record["axis_order"]), tuple(record["flip"]))
