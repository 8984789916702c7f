"""The source data behind a cached CellMap volume, for the viewer: the raw and label levels
the volume was read from (found in the catalog of --data-root / $DINOV3_DATA_ROOT /
--catalog by the dataset, crop and organelles its metadata records, at the recorded voxel
sizes or the nearest finer level), cut to the world box the volume covers, each with its
world corner, so it lies exactly under the cached arrays; and, for a state file, the URL each
level has for a neuroglancer the user runs, with how neuroglancer lays out its voxels.

When no root is given there is nothing to add; when the source cannot be reached the caller
prints one note and shows the cached volume alone.
"""

from __future__ import annotations

import math
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dinov3_cache.errors import CacheToolError
from dinov3_cache.geometry import SPATIAL_AXES, CropGeometry
from dinov3_cache.paths import VolumePaths
from dinov3_cache.schema import load_volume_metadata
from dinov3_cache.sources.base import SourceError
from dinov3_cache.sources.cellmap import CellMapSource, CropUnit, LevelArray, source_from_args
from dinov3_cache.sources.cellmap.ome_ngff import N5_ATTRIBUTES, TOLERANCE
from dinov3_cache.sources.cellmap.store import Storage, is_s3, join_url, split_s3
from dinov3_cache.sources.registry import implied_source_name
from dinov3_cache.zarr_arrays import ATTRIBUTE_FILES, METADATA_FILES

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


@dataclass
class SourceLayer:
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
        """World nm of the cut's first voxel corner."""
        return [float(v) for v in self.level.lo + np.asarray(self.first) * np.asarray(self.level.level.scale)]

    def read(self) -> np.ndarray:
        values = self.level.store[tuple(slice(f, e) for f, e in zip(self.first, self.last))].read().result()
        return self.encoding.decode(values)[0] if self.encoding is not None else values


@dataclass(frozen=True)
class SourceOrigin:
    """Where the levels were read from: the catalog's data root, and the S3-compatible server
    its s3:// URLs were read through (None: AWS)."""

    root: str | None
    s3_endpoint: str | None = None


def wants_source(args) -> bool:
    return implied_source_name(vars(args)) is not None  # the options locate source data


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


def source_layers(output_dir: Path, index: int, args) -> tuple[list[SourceLayer], SourceOrigin]:
    """(layers, origin) for the volume's source crop; SourceError when it cannot be reached."""
    record = load_volume_metadata(VolumePaths(Path(output_dir), index).metadata).source_dataset.to_dict()
    if "catalog_root" not in record or "crop" not in record:
        raise SourceError(f"volume {index} was not read from CellMap data (source {record.get('name', '?')})")
    # the catalog is listed afresh and never saved into the cache the viewer only reads
    options = types.SimpleNamespace(**{**vars(args), "output_dir": None, "refresh_catalog": False, "augment": False})
    source: CellMapSource = source_from_args(options)
    dataset = next((d for d in source.catalog.datasets if d.name == record["dataset"]), None)
    if dataset is None:
        raise SourceError(f"dataset {record['dataset']} is not in the catalog of {source.catalog.root or args.catalog}")
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
    layers = []
    for name, level, kind in [("raw", resolved.raw, "image"), *((o, a, "segmentation") for o, a in resolved.labels.items())]:
        window = cut(level, offset, extent)
        if window is not None:
            dimensions = stored_dimensions(level, source.storage)
            layers.append(SourceLayer(SOURCE_PREFIX + name, kind, level, *window, resolved.encodings.get(name), dimensions))
    return layers, SourceOrigin(source.catalog.root, source.storage.s3.endpoint)


def reachable_source_layers(output_dir: Path, index: int, args) -> tuple[list[SourceLayer], SourceOrigin | None]:
    """source_layers, or none and one printed note when the source cannot be reached."""
    if not wants_source(args):
        return [], None
    try:
        return source_layers(output_dir, index, args)
    except (CacheToolError, OSError) as e:
        print(f"note: source data not shown ({str(e).splitlines()[0]}); showing the cached volume alone", flush=True)
        return [], None


def state_url(layer: SourceLayer, origin: SourceOrigin | None, local_base: str) -> str | None:
    """The level's URL for a neuroglancer the user runs: s3:// as is (AWS), or path-style on
    the --s3-endpoint server over its HTTP(S); a local level under the data root through
    local_base (ROOT served over HTTP); None otherwise."""
    url, scheme = layer.level.url, layer.level.multiscale.driver  # zarr | zarr3 | n5: neuroglancer's names too
    if origin is None:
        return None
    if is_s3(url):
        return f"{scheme}://{join_url(origin.s3_endpoint, *split_s3(url))}" if origin.s3_endpoint else f"{scheme}://{url}"
    prefix = (origin.root or "").rstrip("/") + "/"
    if origin.root and url.startswith(prefix):
        return f"{scheme}://{local_base}/{url[len(prefix):]}"
    return None
