"""The CellMap data behind a cached volume, for the viewer: the raw and label levels the
volume was read from (found in the catalog of --data-root / $DINOV3_DATA_ROOT / --catalog by
the dataset, crop and organelles its metadata records, at the recorded voxel sizes or the
nearest finer level), cut to the world box the volume covers, each with its world corner, so
it lies exactly under the cached arrays; and, for a state file, the URL each level has for a
neuroglancer the user runs, with how neuroglancer lays out its voxels."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from dinov3_cache.geometry import CropGeometry
from dinov3_cache.sources.base import SourceError
from dinov3_cache.sources.cellmap.crops import CropUnit
from dinov3_cache.sources.cellmap.ome_ngff import N5_ATTRIBUTES, TOLERANCE, LevelArray
from dinov3_cache.sources.cellmap.store import Storage, is_s3, join_url, split_s3
from dinov3_cache.sources.viewer import CACHED_DIMENSIONS, SOURCE_PREFIX, SourceLayer, SourceOrigin, StoredDimensions
from dinov3_cache.zarr_arrays import ATTRIBUTE_FILES, METADATA_FILES


@dataclass
class LevelLayer(SourceLayer):
    name: str
    kind: str  # image | segmentation
    level: LevelArray
    first: tuple[int, ...]  # the cut, in the level's voxels
    last: tuple[int, ...]
    encoding: object | None = None  # labels: the annotation encoding ('unknown' shown as 0)
    dimensions: StoredDimensions = CACHED_DIMENSIONS  # for a state file (stored_dimensions)

    @property
    def voxel_size(self) -> list[float]:
        return list(self.level.level.scale)

    @property
    def offset(self) -> list[float]:
        return [float(v) for v in self.level.lo + np.asarray(self.first) * np.asarray(self.level.level.scale)]

    @property
    def corner(self) -> list[float]:
        return [float(v) for v in self.level.lo]

    @property
    def location(self) -> str:
        return self.level.url

    def read(self) -> np.ndarray:
        values = self.level.store[tuple(slice(f, e) for f, e in zip(self.first, self.last))].read().result()
        return self.encoding.decode(values)[0] if self.encoding is not None else values

    def state_url(self, origin: SourceOrigin | None, local_base: str) -> str | None:
        """s3:// as is (AWS), or path-style on the --s3-endpoint server over its HTTP(S); a local
        level under the data root through local_base; None otherwise."""
        url, scheme = self.level.url, self.level.multiscale.driver  # zarr | zarr3 | n5: neuroglancer's names too
        if origin is None:
            return None
        if is_s3(url):
            return f"{scheme}://{join_url(origin.s3_endpoint, *split_s3(url))}" if origin.s3_endpoint else f"{scheme}://{url}"
        prefix = (origin.root or "").rstrip("/") + "/"
        if origin.root and url.startswith(prefix):
            return f"{scheme}://{local_base}/{url[len(prefix):]}"
        return None


def cut(level: LevelArray, offset_nm: np.ndarray, extent_nm: np.ndarray) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """The level voxels covering [offset, offset + extent) nm, clipped to the array; None if none."""
    scale = np.asarray(level.level.scale)
    first = [max(0, math.floor((o - lo) / s + TOLERANCE)) for o, lo, s in zip(offset_nm, level.lo, scale)]
    last = [min(int(n), math.ceil((o + e - lo) / s - TOLERANCE)) for o, e, lo, s, n in zip(offset_nm, extent_nm, level.lo, scale, level.shape)]
    return (tuple(first), tuple(last)) if all(f < e for f, e in zip(first, last)) else None


def listed_names(listed, default: list[str]) -> tuple[str, ...]:
    """The names a metadata list gives, neuroglancer's defaults where it gives none."""
    listed = listed if isinstance(listed, list) and len(listed) == len(default) else [None] * len(default)
    return tuple(n if isinstance(n, str) else d for n, d in zip(listed, default))


def stored_dimensions(level: LevelArray, storage: Storage) -> StoredDimensions:
    """The level's dimensions as neuroglancer reads them from its metadata: N5 `axes` (else
    x, y, z) and `downsamplingFactors` (voxel i at i * factor), the level's over its group's
    (neuroglancer merges every ancestor's; CellMap writes them on these two); zarr
    `_ARRAY_DIMENSIONS` (v2) or `dimension_names` (v3), else d0.. / dim_0.."""
    multiscale = level.multiscale
    axes = tuple(multiscale.axis_order.index(p) for p in range(3))  # the axis at each stored position
    if multiscale.driver == "n5":
        documents = [storage.read_json(join_url(url, N5_ATTRIBUTES)) or {} for url in (multiscale.url, level.url)]
        attributes = {**documents[0], **documents[1]}
        factors = attributes.get("downsamplingFactors")
        flat = isinstance(factors, list) and len(factors) == 3 and all(isinstance(f, (int, float)) and f > 0 for f in factors)
        step = tuple(float(f) for f in factors) if flat else (1.0, 1.0, 1.0)
        return StoredDimensions(listed_names(attributes.get("axes"), ["x", "y", "z"]), axes[::-1], step)  # N5 lists them reversed
    if multiscale.driver == "zarr":
        listed = (storage.read_json(join_url(level.url, ATTRIBUTE_FILES[2])) or {}).get("_ARRAY_DIMENSIONS")
        return StoredDimensions(listed_names(listed, [f"d{i}" for i in range(3)]), axes)
    listed = (storage.read_json(join_url(level.url, METADATA_FILES[3])) or {}).get("dimension_names")
    return StoredDimensions(listed_names(listed, [f"dim_{i}" for i in range(3)]), axes)


def cellmap_viewer_layers(record: Mapping[str, Any], settings: Mapping[str, Any]) -> tuple[list[SourceLayer], SourceOrigin]:
    """(layers, origin) for the crop a volume's `source_dataset` record names, found through
    the catalog these option values give; SourceError when it cannot be reached."""
    from dinov3_cache.sources.cellmap.source import CellMapSource

    if "catalog_root" not in record or "crop" not in record:
        raise SourceError(f"it was not read from CellMap data (source {record.get('name', '?')})")
    # the catalog is listed afresh and never saved into the cache the viewer only reads
    source = CellMapSource.from_settings({**settings, "output_dir": None, "refresh_catalog": False, "augment": False})
    dataset = next((d for d in source.catalog.datasets if d.name == record["dataset"]), None)
    if dataset is None:
        raise SourceError(f"dataset {record['dataset']} is not in the catalog of {source.catalog.root or settings.get('catalog')}")
    organelles = [name for name in record["levels"] if name != "raw"]
    urls = {(e.organelle, e.crop): e.url for e in dataset.labels}
    missing = [o for o in organelles if (o, record["crop"]) not in urls]
    if missing:
        raise SourceError(f"{record['dataset']} {record['crop']} has no {', '.join(missing)} labels in the catalog")
    unit = CropUnit(record["dataset"], record["crop"], dataset.raw, tuple((o, urls[o, record["crop"]]) for o in organelles))
    voxel = record["voxel_size_nm"]
    extent = np.asarray(record["extent_nm"], float)
    geometry = CropGeometry(voxel["labels"][0], voxel["raw"][0], round(extent[0] / voxel["labels"][0]))
    resolved = source.resolve(unit, geometry)
    offset = np.asarray(record["offset_nm"], float)
    layers: list[SourceLayer] = []
    for name, level, kind in [("raw", resolved.raw, "image"), *((o, a, "segmentation") for o, a in resolved.labels.items())]:
        window = cut(level, offset, extent)
        if window is not None:
            dimensions = stored_dimensions(level, source.storage)
            layers.append(LevelLayer(SOURCE_PREFIX + name, kind, level, *window, resolved.encodings.get(name), dimensions))
    return layers, SourceOrigin(source.catalog.root, source.storage.s3.endpoint)
