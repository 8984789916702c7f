"""The source data behind a cached CellMap volume, for the viewer: the raw and label levels
the volume was read from (found in the catalog of --data-root / $DINOV3_DATA_ROOT /
--catalog by the dataset, crop and organelles its metadata records, at the recorded voxel
sizes or the nearest finer level), cut to the world box the volume covers, each with its
world corner, so it lies exactly under the cached arrays.

When no root is given there is nothing to add; when the source cannot be reached the caller
prints one note and shows the cached volume alone.
"""

from __future__ import annotations

import math
import os
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dinov3_cache.errors import CacheToolError
from dinov3_cache.geometry import CropGeometry
from dinov3_cache.layout import VolumePaths
from dinov3_cache.schema import load_volume_metadata
from dinov3_cache.sources.base import DATA_ROOT_ENV, SourceError
from dinov3_cache.sources.cellmap import CellMapSource, CropUnit, LevelArray, source_from_args
from dinov3_cache.sources.cellmap.ome_ngff import TOLERANCE
from dinov3_cache.sources.cellmap.store import is_s3

SOURCE_PREFIX = "source "  # layer names: 'source raw', 'source mito', ...


@dataclass
class SourceLayer:
    name: str
    kind: str  # image | segmentation
    level: LevelArray
    first: tuple[int, ...]  # the cut, in the level's voxels
    last: tuple[int, ...]
    encoding: object | None = None  # labels: the annotation encoding ('unknown' shown as 0)

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


def wants_source(args) -> bool:
    return bool(getattr(args, "data_root", None) or getattr(args, "catalog", None) or os.environ.get(DATA_ROOT_ENV))


def cut(level: LevelArray, offset_nm: np.ndarray, extent_nm: np.ndarray) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """The level voxels covering [offset, offset + extent) nm, clipped to the array; None if none."""
    scale = np.asarray(level.level.scale)
    first = [max(0, math.floor((o - lo) / s + TOLERANCE)) for o, lo, s in zip(offset_nm, level.lo, scale)]
    last = [min(int(n), math.ceil((o + e - lo) / s - TOLERANCE)) for o, e, lo, s, n in zip(offset_nm, extent_nm, level.lo, scale, level.shape)]
    return (tuple(first), tuple(last)) if all(f < e for f, e in zip(first, last)) else None


def source_layers(output_dir: Path, index: int, args) -> tuple[list[SourceLayer], str | None]:
    """(layers, root) for the volume's source crop; SourceError when it cannot be reached."""
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
            layers.append(SourceLayer(SOURCE_PREFIX + name, kind, level, *window, resolved.encodings.get(name)))
    return layers, source.catalog.root


def reachable_source_layers(output_dir: Path, index: int, args) -> tuple[list[SourceLayer], str | None]:
    """source_layers, or none and one printed note when the source cannot be reached."""
    if not wants_source(args):
        return [], None
    try:
        return source_layers(output_dir, index, args)
    except (CacheToolError, OSError) as e:
        print(f"note: source data not shown ({str(e).splitlines()[0]}); showing the cached volume alone", flush=True)
        return [], None


def state_url(layer: SourceLayer, root: str | None, local_base: str) -> str | None:
    """The level's URL for a neuroglancer the user runs: s3:// (AWS) as is, a local level
    under the data root through local_base (ROOT served over HTTP); None otherwise."""
    url, driver = layer.level.url, layer.level.multiscale.driver
    if driver == "n5" or layer.level.multiscale.axis_order != (0, 1, 2):
        return None  # the transform written assumes z, y, x stored in that order
    scheme = driver
    if is_s3(url):
        return f"{scheme}://{url}"
    prefix = (root or "").rstrip("/") + "/"
    if root and url.startswith(prefix):
        return f"{scheme}://{local_base}/{url[len(prefix):]}"
    return None
