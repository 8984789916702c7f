"""One cached volume in neuroglancer: raw (when saved), gt as segmentation, mask, and the
features as RGB of their first three principal components, placed in world nm from the
cache's geometry (each array's `voxel_size` and `offset`), so every layer sits where its
voxels lie in the source dataset. Augmented volumes are shown unmoved (their recorded
world transform undone).

`neuroglancer` is an optional dependency, imported on use (pip install neuroglancer).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np

from dinov3_cache.audit.previews import pca_rgb
from dinov3_cache.audit.view_source import CACHED_DIMENSIONS, SourceLayer, SourceOrigin, StoredDimensions, state_url
from dinov3_cache.errors import CacheToolError
from dinov3_cache.geometry import SPATIAL_AXES, UNIT
from dinov3_cache.paths import VolumePaths
from dinov3_cache.schema import load_volume_metadata
from dinov3_cache.zarr_arrays import open_array, read_array_metadata, read_attributes

DEFAULT_BIND_ADDRESS = "127.0.0.1"
MAX_FEATURE_VALUES = 2**26  # features read for the PCA view; larger volumes are strided
# --view-state: neuroglancer reads the arrays over HTTP; serve OUTPUT_DIR here with CORS on
STATE_BASE_URL = "http://{host}:8000"
SOURCE_BASE_URL = "http://{host}:8001"  # --view-state with a local data root: serve ROOT here
RGB_SHADER = "void main() { emitRGB(vec3(toNormalized(getDataValue(0)), toNormalized(getDataValue(1)), toNormalized(getDataValue(2)))); }"
MASK_SHADER = "void main() { emitRGBA(vec4(0.0, 0.6, 1.0, 0.35 * float(getDataValue() == 0u))); }"


class ViewError(CacheToolError):
    """The volume cannot be shown; one actionable line."""


def import_neuroglancer():
    try:
        import neuroglancer
    except ImportError:
        raise ViewError("--view needs the neuroglancer package: pip install neuroglancer") from None
    return neuroglancer


def world_space(neuroglancer, voxel_size: list[float], channels: bool = False):
    names, units, scales = list(SPATIAL_AXES), [UNIT] * 3, list(voxel_size)
    if channels:
        names, units, scales = [*names, "c^"], [*units, ""], [*scales, 1]
    return neuroglancer.CoordinateSpace(names=names, units=units, scales=scales)


def volume_metadata_path(output_dir: Path, index: int) -> Path:
    """The volume's metadata file; ViewError when the volume is not complete."""
    paths = VolumePaths(Path(output_dir), index)
    if not paths.metadata.is_file():
        raise ViewError(f"volume {index} is not complete in {output_dir} (no {paths.metadata.name}); run check_preprocessing.py to see why")
    return paths.metadata


def volume_arrays(output_dir: Path, index: int, num_threads: int = 8) -> dict[str, tuple[np.ndarray, dict]]:
    """name -> (unmoved z, y, x[, rgb] array, its attributes) for every array of the volume."""
    paths = VolumePaths(Path(output_dir), index)
    metadata = load_volume_metadata(volume_metadata_path(output_dir, index))
    transform = metadata.source_dataset.axis_transform
    arrays = {}
    for name in ("raw", "gt", "mask"):
        if paths.array(name).is_dir():
            arrays[name] = (transform.undo(open_array(paths.array(name)).read().result()), read_attributes(paths.array(name)))
    features = open_array(paths.array("features"))
    attributes = read_attributes(paths.array("features"))
    step = max(1, math.ceil((features.size / MAX_FEATURE_VALUES) ** (1 / 3)))
    values = np.asarray(features[:, ::step, ::step, ::step].read().result(), np.float32)
    c, d, h, w = values.shape
    rgb = pca_rgb(values.reshape(c, d * h, w)).reshape(d, h, w, 3)
    rgb = np.stack([transform.undo(rgb[..., k]) for k in range(3)], axis=-1) if step == 1 else rgb
    attributes = {**attributes, "voxel_size": [v * step for v in attributes["voxel_size"]]}
    arrays["features"] = (rgb, attributes)
    return arrays


def world_source(neuroglancer, data: np.ndarray, voxel: list[float], offset: list[float], channels: bool = False):
    """A LocalVolume in world nm: its transform translates by the offset in its voxels
    (LocalVolume's voxel_offset is whole voxels only; crop offsets need not be)."""
    dimensions = world_space(neuroglancer, voxel, channels)
    shift = [o / v for o, v in zip(offset, voxel)] + ([0.0] if channels else [])
    rank = len(shift)
    return neuroglancer.LayerDataSource(
        url=neuroglancer.LocalVolume(data, dimensions=dimensions),
        transform=neuroglancer.CoordinateSpaceTransform(
            output_dimensions=dimensions,
            matrix=[[1.0 if j == i else 0.0 for j in range(rank)] + [shift[i]] for i in range(rank)],
        ),
    )


def add_volume_layers(neuroglancer, state, arrays: dict[str, tuple[np.ndarray, dict]]) -> None:
    """The cached arrays' layers in world nm, and the view centred on the crop."""
    for name, (data, attributes) in arrays.items():
        volume = world_source(neuroglancer, data, attributes["voxel_size"], attributes["offset"], name == "features")
        if name == "gt":
            state.layers[name] = neuroglancer.SegmentationLayer(source=volume)
        elif name == "raw":
            state.layers[name] = neuroglancer.ImageLayer(source=volume)
        elif name == "mask":
            state.layers[name] = neuroglancer.ImageLayer(source=volume, shader=MASK_SHADER)
        else:
            state.layers[name] = neuroglancer.ImageLayer(source=volume, shader=RGB_SHADER)
            state.layers[name].visible = False  # on demand: it hides the others
    finest = min(arrays.values(), key=lambda a: a[1]["voxel_size"][0])[1]["voxel_size"]
    state.dimensions = world_space(neuroglancer, finest)
    gt, attributes = arrays["gt"]
    # the centre of the crop's middle gt voxel, in the global dimensions' units (the finest voxel)
    state.position = [(o + (n // 2 + 0.5) * v) / f for o, n, v, f in zip(attributes["offset"], gt.shape, attributes["voxel_size"], finest)]


def add_source_layers(neuroglancer, state, layers: list[SourceLayer]) -> None:
    """The source crop's layers (read now, served from this process), under the cached ones."""
    for layer in layers:
        volume = world_source(neuroglancer, layer.read(), layer.voxel_size, layer.offset)
        kind = neuroglancer.SegmentationLayer if layer.kind == "segmentation" else neuroglancer.ImageLayer
        state.layers[layer.name] = kind(source=volume)


def open_viewer(output_dir: Path, index: int, bind_address: str = DEFAULT_BIND_ADDRESS, source: list[SourceLayer] = ()):
    """A neuroglancer viewer showing the volume (served from this process), and the source
    crop's layers when given (view_source.reachable_source_layers)."""
    neuroglancer = import_neuroglancer()
    arrays = volume_arrays(output_dir, index)
    neuroglancer.set_server_bind_address(bind_address)
    viewer = neuroglancer.Viewer()
    with viewer.txn() as state:
        add_volume_layers(neuroglancer, state, arrays)
        add_source_layers(neuroglancer, state, list(source))
    return viewer


def serve(viewer) -> None:
    """Print the URL and keep the server up until interrupted."""
    print(f"neuroglancer: {viewer}", flush=True)
    print("serving until stopped (Ctrl-C)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass


def state_layer(kind: str, name: str, url: str, voxel: list[float], offset: list[float], dimensions: StoredDimensions = CACHED_DIMENSIONS) -> dict:
    """A layer whose voxel 0 corner lies at offset nm (voxel, offset: z, y, x nm). neuroglancer's
    matrix maps the source's coordinates to the output's in the physical units of each, so the
    input dimensions are given too (a zarr array's own are unitless), under the names
    neuroglancer gives them (a name it does not know leaves that dimension untransformed)."""
    names, axes, step = dimensions.names, dimensions.axes, dimensions.step
    return {
        "type": kind, "name": name,
        "source": {
            "url": url,
            "transform": {
                "inputDimensions": {n: [voxel[a] / s * 1e-9, "m"] for n, a, s in zip(names, axes, step)},
                "outputDimensions": {SPATIAL_AXES[a]: [voxel[a] * 1e-9, "m"] for a in axes},
                "matrix": [[1.0 if j == k else 0.0 for j in range(3)] + [offset[a] / voxel[a]] for k, a in enumerate(axes)],
            },
        },
    }


def source_state_layers(layers: list[SourceLayer], origin: SourceOrigin | None, bind_address: str) -> list[dict]:
    """Whole source levels placed at their world corners (the crop lies where the cached
    arrays do); local levels read from ROOT served at SOURCE_BASE_URL (state_url)."""
    out = []
    for layer in layers:
        url = state_url(layer, origin, SOURCE_BASE_URL.format(host=bind_address))
        if url is None:
            print(f"note: {layer.name} ({layer.level.url}) left out of the state: only levels under the data root or on S3 are written")
            continue
        out.append(state_layer(layer.kind, layer.name, url, layer.voxel_size, [float(v) for v in layer.level.lo], layer.dimensions))
    return out


def state_document(output_dir: Path, index: int, bind_address: str = DEFAULT_BIND_ADDRESS, source: list[SourceLayer] = (), origin: SourceOrigin | None = None) -> dict:
    """Viewer state for a neuroglancer the user runs: raw, gt and mask read as zarr over
    HTTP from STATE_BASE_URL (neuroglancer cannot open the float16 features), and the
    source levels when given."""
    paths = VolumePaths(Path(output_dir), index)
    volume_metadata_path(output_dir, index)
    base = STATE_BASE_URL.format(host=bind_address)
    layers, gt_attributes = [], None
    for name, kind in (("raw", "image"), ("gt", "segmentation"), ("mask", "image")):
        array = paths.array(name)
        if not array.is_dir():
            continue
        attributes = read_attributes(array)
        gt_attributes = attributes if name == "gt" else gt_attributes
        layers.append(state_layer(kind, name, f"zarr://{base}/{array.name}", attributes["voxel_size"], attributes["offset"]))
    return {
        "dimensions": {a: [v * 1e-9, "m"] for a, v in zip(SPATIAL_AXES, gt_attributes["voxel_size"])},
        "position": [o / v + n / 2 for o, v, n in zip(gt_attributes["offset"], gt_attributes["voxel_size"], read_array_metadata(paths.array("gt")).shape)],
        "layers": layers + source_state_layers(list(source), origin, bind_address),
        "layout": "4panel",
    }


def write_state(output_dir: Path, index: int, path: Path, bind_address: str = DEFAULT_BIND_ADDRESS, source: list[SourceLayer] = (), origin: SourceOrigin | None = None) -> Path:
    Path(path).write_text(json.dumps(state_document(output_dir, index, bind_address, source, origin), indent=2))
    return Path(path)
