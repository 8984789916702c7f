"""The slicing planes: each plane's normal axis and image axes (z=0, y=1, x=2). The extraction
slices along them and the token grids are stored per plane in this order of axes."""

from __future__ import annotations

PLANE_AXES = {"xy": (0, (1, 2)), "xz": (1, (0, 2)), "yz": (2, (0, 1))}  # normal axis, image axes (z=0, y=1, x=2)
PLANES = tuple(PLANE_AXES)
