"""What a source shows in the viewer beside a cached volume: its layers (`SourceLayer`) and
where they were read from (`SourceOrigin`). A source provides them through
`VolumeSource.viewer_layers`; the audit's viewer places them without knowing the source."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from dinov3_cache.geometry import SPATIAL_AXES

SOURCE_PREFIX = "source "  # layer names: 'source raw', 'source mito', ...


@dataclass(frozen=True)
class StoredDimensions:
    """An array's dimensions as neuroglancer lists them (N5: fastest first): the names it gives
    them (a state's inputDimensions must repeat them), the z, y, x axis (0, 1, 2) each holds,
    and the coordinates it gives one voxel along each (an N5 level's downsamplingFactors)."""

    names: tuple[str, ...]
    axes: tuple[int, ...] = (0, 1, 2)
    step: tuple[float, ...] = (1.0, 1.0, 1.0)


CACHED_DIMENSIONS = StoredDimensions(SPATIAL_AXES)  # the cache's arrays name theirs z, y, x


@dataclass(frozen=True)
class SourceOrigin:
    """Where the levels were read from: the data root, and the S3-compatible server its
    s3:// URLs were read through (None: AWS)."""

    root: str | None
    s3_endpoint: str | None = None


class SourceLayer(ABC):
    """One source array cut to the world box a cached volume covers."""

    name: str
    kind: str  # image | segmentation
    dimensions: StoredDimensions

    @property
    @abstractmethod
    def voxel_size(self) -> list[float]:
        """nm per voxel, z, y, x."""

    @property
    @abstractmethod
    def offset(self) -> list[float]:
        """World nm of the cut's first voxel corner."""

    @property
    @abstractmethod
    def corner(self) -> list[float]:
        """World nm of the whole array's first voxel corner (a state file shows the whole array)."""

    @property
    @abstractmethod
    def location(self) -> str:
        """Where the array is, as a user would name it (a path or URL)."""

    @abstractmethod
    def read(self) -> np.ndarray:
        """The cut's values, labels decoded as the cache stores them."""

    @abstractmethod
    def state_url(self, origin: SourceOrigin | None, local_base: str) -> str | None:
        """The array's URL for a neuroglancer the user runs (local files under the data root
        through local_base, that root served over HTTP); None when it has none."""
