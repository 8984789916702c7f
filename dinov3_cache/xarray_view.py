"""One cached volume as an `xarray.Dataset`: `open_volume(output_dir, index)`.

xarray cannot open the cache by itself: every array stands alone (no zarr group), a volume's
arrays lie on different grids (raw at 32 nm beside gt at 128 nm) under the same axis names,
and its CF decoding turns the fill value 0 into NaN. Here each array becomes one variable,
read lazily through TensorStore (xarray's backend array protocol: a slice reads only what it
covers), with its stored dtype, on its own dimensions: the features' grid (features, gt and
mask) is `z, y, x`, any other grid's dimensions carry the array's name (`z_raw, y_raw,
x_raw`). Coordinates are the world positions in nm of the voxel centres (`offset + (i + 0.5)
* voxel_size`). Tokens volumes deliver `features` built from their tokens
(`features_from_tokens`, float32) for the region read.

xarray is an optional dependency, imported on use (pip install xarray).
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from dinov3_cache.errors import CacheToolError
from dinov3_cache.geometry import CHANNEL_AXIS, SPATIAL_AXES, AxisTransform
from dinov3_cache.paths import VolumePaths
from dinov3_cache.schema import load_volume_metadata
from dinov3_cache.zarr_arrays import open_array, read_attributes, ts_context

VARIABLES = ("features", "gt", "mask", "raw")
UNIT = "nm"


class OpenVolumeError(CacheToolError):
    """The volume cannot be opened; one actionable line."""


def import_xarray():
    try:
        import xarray
    except ImportError:
        raise OpenVolumeError("open_volume needs the xarray package: pip install xarray") from None
    return xarray


def lazy_array_types(xarray):
    """The backend array classes, defined once xarray is imported (it is optional)."""
    from xarray.backends import BackendArray
    from xarray.core import indexing

    class StoredArray(BackendArray):
        """A TensorStore array read on indexing: basic indexing (ints and slices) goes to
        TensorStore, xarray applies the rest to what was read."""

        def __init__(self, store):
            self.store, self.shape, self.dtype = store, tuple(store.shape), np.dtype(store.dtype.numpy_dtype)

        def __getitem__(self, key):
            return indexing.explicit_indexing_adapter(key, self.shape, indexing.IndexingSupport.BASIC, self.read)

        def read(self, key: tuple) -> np.ndarray:
            return np.asarray(self.store[key].read().result())

    class BuiltFeatures(BackendArray):
        """The features (C, D, H, W), float32, of a storage form that builds them (tokens): built
        by the form's read_region for the box each read covers."""

        def __init__(self, paths: VolumePaths, metadata, num_threads: int):
            self.form, self.planes = metadata.storage_form, metadata.configuration.planes
            self.stored = open_array(paths.array(self.form.array_name), ts_context(num_threads))
            self.shape, self.dtype = tuple(metadata.shapes["features"]), np.dtype("float32")
            self.lock = threading.Lock()  # torch's own threads do the work

        def __getitem__(self, key):
            return indexing.explicit_indexing_adapter(key, self.shape, indexing.IndexingSupport.BASIC, self.read)

        def read(self, key: tuple) -> np.ndarray:
            channels, *spatial = key
            region, within = [], []
            for k, n in zip(spatial, self.shape[1:]):
                if isinstance(k, slice):
                    start, stop, step = k.indices(n)
                    region.append((start, max(start, stop)))
                    within.append(slice(None, None, step))
                else:
                    region.append((int(k), int(k) + 1))
                    within.append(0)
            channel_ids = np.arange(self.shape[0])[channels]
            if any(lo == hi for lo, hi in region) or np.size(channel_ids) == 0:
                return np.zeros(np.empty((self.shape[0], *(hi - lo for lo, hi in region)), np.bool_)[(channels, *within)].shape, self.dtype)
            with self.lock:
                values = self.form.read_region(self.stored, self.planes, region)[np.atleast_1d(channel_ids)]
            return values[(slice(None) if np.ndim(channel_ids) else 0, *within)]

    return StoredArray, BuiltFeatures


def grid_key(attributes: dict, shape: tuple[int, ...]) -> tuple:
    return tuple(attributes["voxel_size"]), tuple(attributes["offset"]), tuple(shape)


def spatial_coordinates(attributes: dict, shape: tuple[int, ...], transform: AxisTransform, suffix: str) -> tuple[list[str], dict]:
    """The stored axes' dimension names and their coordinates (voxel centres, nm): stored axis
    i shows world axis axis_order[i], reversed where flipped (an augmented volume's)."""
    names, coordinates = [], {}
    for stored_axis, world_axis in enumerate(transform.axis_order):
        voxel, offset = attributes["voxel_size"][world_axis], attributes["offset"][world_axis]
        centres = offset + (np.arange(shape[stored_axis]) + 0.5) * voxel
        name = SPATIAL_AXES[world_axis] + suffix
        names.append(name)
        coordinates[name] = (name, centres[::-1] if transform.flip[stored_axis] else centres, {"units": UNIT})
    return names, coordinates


def open_volume(output_dir: Path | str, index: int, num_threads: int = 8):
    """Volume `index` of the cache in `output_dir` as an xarray.Dataset: variables features
    (c, z, y, x), gt, mask and raw (those the volume has), lazy, in their stored dtypes, on
    world coordinates in nm (voxel centres); attributes: the volume's index, layout and commit id."""
    xarray = import_xarray()
    StoredArray, BuiltFeatures = lazy_array_types(xarray)
    from xarray.core import indexing

    paths = VolumePaths(Path(output_dir), index)
    if not paths.metadata.is_file():
        raise OpenVolumeError(f"volume {index} is not complete in {output_dir} (no {paths.metadata.name})")
    metadata = load_volume_metadata(paths.metadata)
    transform = metadata.source_dataset.axis_transform
    context = ts_context(num_threads)
    form = metadata.storage_form
    grid_array = paths.array("gt" if form.builds_features else form.array_name)  # built features: gt's grid
    grids = {grid_key(read_attributes(grid_array), metadata.shapes["features"][1:]): ""}  # the features' grid: z, y, x
    variables, coordinates = {}, {}
    for name in VARIABLES:
        if name == "features" and form.builds_features:
            data, attributes = BuiltFeatures(paths, metadata, num_threads), read_attributes(grid_array)
        elif paths.array(name).is_dir():
            data, attributes = StoredArray(open_array(paths.array(name), context)), read_attributes(paths.array(name))
        else:
            continue
        spatial_shape = data.shape[-3:]
        suffix = grids.setdefault(grid_key(attributes, spatial_shape), f"_{name}")
        names, coords = spatial_coordinates(attributes, spatial_shape, transform, suffix)
        coordinates.update(coords)
        dims = ([CHANNEL_AXIS] if len(data.shape) == 4 else []) + names
        kept = {k: attributes[k] for k in ("voxel_size", "offset", "units") if k in attributes}
        variables[name] = xarray.Variable(dims, indexing.LazilyIndexedArray(data), kept)
    return xarray.Dataset(
        variables, coords=coordinates,
        attrs={"volume_index": index, "layout": form.name, "commit_id": metadata.commit_id or ""},
    )
