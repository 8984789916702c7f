"""One cached volume in neuroglancer: raw (when saved), gt as segmentation, mask, and the
features as RGB of their first three principal components, placed in world nm from the
cache's geometry (each array's `voxel_size` and `offset`), so every layer sits where its
voxels lie in the source dataset. Augmented volumes are shown unmoved (their recorded
world transform undone). Both the live viewer and the state file open centred on the crop,
zoomed to fill a panel, with the global dimensions in x, y, z order (neuroglancer names its
panels by that order: "xy" shows the first two).

`neuroglancer` is an optional dependency, imported on use (pip install neuroglancer).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np

from dinov3_cache.audit.previews import feature_slice, pca_rgb
from dinov3_cache.errors import CacheToolError
from dinov3_cache.geometry import SPATIAL_AXES, UNIT, VoxelGrid
from dinov3_cache.paths import VolumePaths, preview_path
from dinov3_cache.schema import load_volume_metadata
from dinov3_cache.sources.viewer import CACHED_DIMENSIONS, SourceLayer, SourceOrigin, StoredDimensions
from dinov3_cache.zarr_arrays import StorageOptions, create_array, open_array, read_array_metadata, read_attributes, ts_context

DEFAULT_BIND_ADDRESS = "127.0.0.1"
MAX_FEATURE_VALUES = 2**26  # features read for the PCA view; larger volumes are strided
# --view-state: neuroglancer reads the arrays over HTTP; serve OUTPUT_DIR here with CORS on
STATE_BASE_URL = "http://{host}:8000"
SOURCE_BASE_URL = "http://{host}:8001"  # --view-state with a local data root: serve ROOT here
RGB_SHADER = "void main() { emitRGB(vec3(toNormalized(getDataValue(0)), toNormalized(getDataValue(1)), toNormalized(getDataValue(2)))); }"
# integer data reads as a struct (uint8_t ...): compare its .value (a shader that fails to compile shows plain grey)
MASK_SHADER = "void main() { emitRGBA(vec4(0.0, 0.6, 1.0, 0.35 * float(getDataValue().value == 0u))); }"
DISPLAY_AXES = ("x", "y", "z")  # the global dimensions' order: the panels "xy", "xz", "yz" show what they name
PANEL_PIXELS = 400  # the panel the opening zoom fits the crop into (4-panel layout in a window of ~800 px)
PANEL_FILL = 0.9  # the crop's share of that panel's side
PREVIEW_CHUNKS = (3, 64, 64, 64)


class ViewError(CacheToolError):
    """The volume cannot be shown; one actionable line."""


def import_neuroglancer():
    try:
        import neuroglancer
    except ImportError:
        raise ViewError("--view needs the neuroglancer package: pip install neuroglancer") from None
    return neuroglancer


def world_space(neuroglancer, voxel_size: list[float], channels: bool = False):
    """A stored array's dimensions: [c^,] z, y, x (the channel first, as the cache stores it)."""
    names, units, scales = list(SPATIAL_AXES), [UNIT] * 3, list(voxel_size)
    if channels:
        names, units, scales = ["c^", *names], ["", *units], [1, *scales]
    return neuroglancer.CoordinateSpace(names=names, units=units, scales=scales)


def display_order(zyx: list[float]) -> list[float]:
    """z, y, x values in DISPLAY_AXES order."""
    return [zyx[SPATIAL_AXES.index(a)] for a in DISPLAY_AXES]


def opening_view(gt_attributes: dict, gt_shape: tuple[int, ...], unit: list[float]) -> dict:
    """Where both modes open: the centre of the crop's middle gt voxel (so each panel cuts
    through voxel centres) in the global dimensions (DISPLAY_AXES, `unit` nm each, given z, y,
    x), and the zoom (neuroglancer's scales: the finest global unit per screen pixel) at which
    the crop spans PANEL_FILL of a PANEL_PIXELS panel."""
    voxel, offset = gt_attributes["voxel_size"], gt_attributes["offset"]
    centre = [o + (n // 2 + 0.5) * v for o, n, v in zip(offset, gt_shape, voxel)]
    extent = max(n * v for n, v in zip(gt_shape, voxel))
    per_pixel = extent / (PANEL_FILL * PANEL_PIXELS) / min(unit)
    return {
        "position": display_order([c / u for c, u in zip(centre, unit)]),
        "crossSectionScale": per_pixel,
        "projectionScale": 2.5 * PANEL_PIXELS * per_pixel,  # the 3-d panel's height, in the same units
    }


def volume_metadata_path(output_dir: Path, index: int) -> Path:
    """The volume's metadata file; ViewError when the volume is not complete."""
    paths = VolumePaths(Path(output_dir), index)
    if not paths.metadata.is_file():
        raise ViewError(f"volume {index} is not complete in {output_dir} (no {paths.metadata.name}); run check_preprocessing.py to see why")
    return paths.metadata


def volume_arrays(output_dir: Path, index: int, num_threads: int = 8) -> dict[str, tuple[np.ndarray, dict]]:
    """name -> (unmoved [rgb,] z, y, x array, its attributes) for every array of the volume."""
    paths = VolumePaths(Path(output_dir), index)
    metadata = load_volume_metadata(volume_metadata_path(output_dir, index))
    transform = metadata.source_dataset.axis_transform
    arrays = {}
    for name in ("raw", "gt", "mask"):
        if paths.array(name).is_dir():
            arrays[name] = (transform.undo(open_array(paths.array(name)).read().result()), read_attributes(paths.array(name)))
    arrays["features"] = features_rgb(output_dir, index, num_threads)
    return arrays


def feature_values(paths: VolumePaths, metadata, step: int, num_threads: int) -> np.ndarray:
    """The features (C, D, H, W) float32, every step-th voxel along each axis, in any storage
    form (a form that builds its features builds one slice at a time: bounded memory)."""
    form = metadata.storage_form
    if not form.builds_features:
        features = open_array(paths.array(form.array_name), ts_context(num_threads))
        return np.asarray(features[:, ::step, ::step, ::step].read().result(), np.float32)
    context, depth = ts_context(num_threads), metadata.shapes["features"][1]
    return np.stack([feature_slice(paths, metadata, context, z)[:, ::step, ::step] for z in range(0, depth, step)], axis=1)


def features_rgb(output_dir: Path, index: int, num_threads: int = 8) -> tuple[np.ndarray, dict]:
    """(rgb, attributes): the features as uint8 RGB (3, d, h, w) of their first three principal
    components (the preview's pca_rgb over the whole volume), strided to at most
    MAX_FEATURE_VALUES values read, with the attributes of that grid (voxel size times the stride)."""
    paths = VolumePaths(Path(output_dir), index)
    metadata = load_volume_metadata(volume_metadata_path(output_dir, index))
    transform = metadata.source_dataset.axis_transform
    step = max(1, math.ceil((math.prod(metadata.shapes["features"]) / MAX_FEATURE_VALUES) ** (1 / 3)))
    values = feature_values(paths, metadata, step, num_threads)
    c, d, h, w = values.shape
    rgb = np.moveaxis(pca_rgb(values.reshape(c, d * h, w)).reshape(d, h, w, 3), -1, 0)
    rgb = np.stack([transform.undo(rgb[k]) for k in range(3)]) if step == 1 else np.ascontiguousarray(rgb)
    form = metadata.storage_form
    attributes = read_attributes(paths.array("gt" if form.builds_features else form.array_name))  # the same grid
    return rgb, {**attributes, "voxel_size": [v * step for v in attributes["voxel_size"]]}


def features_preview_path(output_dir: Path, index: int) -> Path:
    """OUT/volume_XXXXXX_preview.zarr: the layout's preview name, as a zarr array beside the
    volume (no array name of the volume: never debris, never counted as a volume's array)."""
    return preview_path(output_dir, index).with_suffix(".zarr")


def write_features_preview(output_dir: Path, index: int, num_threads: int = 8) -> Path:
    """The features' RGB (features_rgb) as a uint8 zarr v2 array (c, z, y, x) on its world grid,
    for a state file (neuroglancer cannot open the float16 features); rewritten on each call."""
    rgb, attributes = features_rgb(output_dir, index, num_threads)
    grid = VoxelGrid(tuple(attributes["voxel_size"]), tuple(attributes["offset"]), rgb.shape[1:])
    stamp = {**attributes.get("dinov3_cache", {}), "volume_index": index, "array": "features preview (PCA RGB)"}
    path = features_preview_path(output_dir, index)
    store = create_array(
        path, rgb.shape, "uint8", PREVIEW_CHUNKS, StorageOptions(), ts_context(num_threads),
        {**grid.array_attributes(True), "dinov3_cache": stamp}, grid.axis_names(True),
    )
    store.write(rgb).result()
    return path


def world_source(neuroglancer, data: np.ndarray, voxel: list[float], offset: list[float], channels: bool = False):
    """A LocalVolume in world nm: its transform translates by the offset in its voxels
    (LocalVolume's voxel_offset is whole voxels only; crop offsets need not be)."""
    dimensions = world_space(neuroglancer, voxel, channels)
    shift = ([0.0] if channels else []) + [o / v for o, v in zip(offset, voxel)]
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
    state.dimensions = neuroglancer.CoordinateSpace(names=list(DISPLAY_AXES), units=[UNIT] * 3, scales=display_order(finest))
    gt, attributes = arrays["gt"]
    view = opening_view(attributes, gt.shape, finest)
    state.position = view["position"]
    state.cross_section_scale, state.projection_scale = view["crossSectionScale"], view["projectionScale"]


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


def state_layer(
    kind: str, name: str, url: str, voxel: list[float], offset: list[float],
    dimensions: StoredDimensions = CACHED_DIMENSIONS, channels: bool = False,
) -> dict:
    """A layer whose voxel 0 corner lies at offset nm (voxel, offset: z, y, x nm). neuroglancer's
    matrix maps the source's coordinates to the output's in the physical units of each, so the
    input dimensions are given too (a zarr array's own are unitless), under the names
    neuroglancer gives them (a name it does not know leaves that dimension untransformed).
    channels: a leading channel dimension `c` (as the cache stores it), shown as neuroglancer's
    channel dimension `c^`."""
    names, axes, step = dimensions.names, dimensions.axes, dimensions.step
    inputs = {n: [voxel[a] / s * 1e-9, "m"] for n, a, s in zip(names, axes, step)}
    outputs = {SPATIAL_AXES[a]: [voxel[a] * 1e-9, "m"] for a in axes}
    matrix = [[1.0 if j == k else 0.0 for j in range(3)] + [offset[a] / voxel[a]] for k, a in enumerate(axes)]
    if channels:
        inputs, outputs = {"c": [1, ""], **inputs}, {"c^": [1, ""], **outputs}
        matrix = [[1.0, 0.0, 0.0, 0.0, 0.0]] + [[0.0, *row] for row in matrix]
    return {"type": kind, "name": name, "source": {"url": url, "transform": {"inputDimensions": inputs, "outputDimensions": outputs, "matrix": matrix}}}


def source_state_layers(layers: list[SourceLayer], origin: SourceOrigin | None, bind_address: str) -> list[dict]:
    """Whole source levels placed at their world corners (the crop lies where the cached
    arrays do); local levels read from ROOT served at SOURCE_BASE_URL (state_url)."""
    out = []
    for layer in layers:
        url = layer.state_url(origin, SOURCE_BASE_URL.format(host=bind_address))
        if url is None:
            print(f"note: {layer.name} ({layer.location}) left out of the state: only levels under the data root or on S3 are written")
            continue
        out.append(state_layer(layer.kind, layer.name, url, layer.voxel_size, layer.corner, layer.dimensions))
    return out


def state_document(
    output_dir: Path, index: int, bind_address: str = DEFAULT_BIND_ADDRESS, source: list[SourceLayer] = (),
    origin: SourceOrigin | None = None, features: bool = False,
) -> dict:
    """Viewer state for a neuroglancer the user runs: raw, gt and mask read as zarr over
    HTTP from STATE_BASE_URL, the features (features=True) from their RGB preview written now
    beside the volume (neuroglancer cannot open the float16 features), and the source levels
    when given."""
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
        if name == "mask":
            layers[-1]["shader"] = MASK_SHADER
    if features:
        preview = write_features_preview(output_dir, index)
        attributes = read_attributes(preview)
        layer = state_layer("image", "features", f"zarr://{base}/{preview.name}", attributes["voxel_size"], attributes["offset"], channels=True)
        layers.append({**layer, "shader": RGB_SHADER, "visible": False})  # on demand: it hides the others
    unit = gt_attributes["voxel_size"]
    return {
        "dimensions": {a: [v * 1e-9, "m"] for a, v in zip(DISPLAY_AXES, display_order(unit))},
        **opening_view(gt_attributes, read_array_metadata(paths.array("gt")).shape, unit),
        "layers": layers + source_state_layers(list(source), origin, bind_address),
        "layout": "4panel",
    }


def write_state(
    output_dir: Path, index: int, path: Path, bind_address: str = DEFAULT_BIND_ADDRESS, source: list[SourceLayer] = (),
    origin: SourceOrigin | None = None, features: bool = False,
) -> Path:
    Path(path).write_text(json.dumps(state_document(output_dir, index, bind_address, source, origin, features), indent=2))
    return Path(path)
