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
from dinov3_cache.layout import VolumePaths
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

    class TokenFeatures(BackendArray):
        """A tokens volume's features (C, D, H, W), float32, built for the box each read covers."""

        def __init__(self, paths: VolumePaths, metadata, num_threads: int):
            self.paths, self.metadata = paths, metadata
            self.tokens = open_array(paths.array("tokens"), ts_context(num_threads))
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
                values = token_region_features(self.tokens, self.metadata, region, np.atleast_1d(channel_ids))
            return values[(slice(None) if np.ndim(channel_ids) else 0, *within)]

    return StoredArray, TokenFeatures


def token_region_features(tokens, metadata, region: list[tuple[int, int]], channels: np.ndarray) -> np.ndarray:
    """features_from_tokens over region (z, y, x ranges) for the given channels, reading only the
    token windows the region's interpolation uses."""
    import torch

    from dinov3_cache.extraction.config import PLANE_AXES
    from dinov3_cache.extraction.upsampling import features_from_tokens, token_window

    _, _, depth, grid_size, _ = tokens.shape
    grids, origins = {}, {}
    for position, plane in enumerate(metadata.configuration.planes):
        normal, image_axes = PLANE_AXES[plane]
        (a0, a1), (b0, b1) = (token_window(grid_size, depth, *region[axis]) for axis in image_axes)
        n0, n1 = region[normal]
        block = tokens[position][channels.tolist(), n0:n1, a0:a1, b0:b1].read().result()
        grids[plane] = torch.from_numpy(np.asarray(block, np.float32))
        origins[plane] = (a0, b0)
    return features_from_tokens(grids, depth, region, grid_size, origins).numpy()


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
    StoredArray, TokenFeatures = lazy_array_types(xarray)
    from xarray.core import indexing

    paths = VolumePaths(Path(output_dir), index)
    if not paths.metadata.is_file():
        raise OpenVolumeError(f"volume {index} is not complete in {output_dir} (no {paths.metadata.name})")
    metadata = load_volume_metadata(paths.metadata)
    transform = AxisTransform.from_record(metadata.source_dataset.to_dict().get("world_transform"))
    context = ts_context(num_threads)
    layout = metadata.configuration.layout or "dense"
    grid_array = paths.array("gt" if layout == "tokens" else "features")  # the tokens are off the grid
    grids = {grid_key(read_attributes(grid_array), metadata.shapes["features"][1:]): ""}  # the features' grid: z, y, x
    variables, coordinates = {}, {}
    for name in VARIABLES:
        if name == "features" and layout == "tokens":
            data, attributes = TokenFeatures(paths, metadata, num_threads), read_attributes(grid_array)
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
        attrs={"volume_index": index, "layout": layout, "commit_id": metadata.integrity.commit_id if metadata.integrity else ""},
    )
