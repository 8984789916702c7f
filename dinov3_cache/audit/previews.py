"""Preview images: the middle z slice of a volume's features (PCA as RGB), labels, mask
and raw, side by side in one PNG per volume.

Imports numpy and TensorStore (and torch for storage forms that build their features, such as
tokens): the audit imports this module only when previewing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dinov3_cache.audit.png import compose, write_png
from dinov3_cache.audit.summaries import source_label
from dinov3_cache.paths import VolumePaths, preview_path
from dinov3_cache.schema import load_volume_metadata
from dinov3_cache.zarr_arrays import open_array, ts_context

PREVIEW_PANEL_PIXELS = 256


def pca_rgb(features) -> np.ndarray:
    """(C, H, W) -> (H, W, 3) uint8: the three main components over channels, each
    stretched between its 1st and 99th percentile."""
    c, h, w = features.shape
    x = features.reshape(c, h * w).T.astype(np.float64)
    x -= x.mean(axis=0)
    _, vectors = np.linalg.eigh(x.T @ x)
    components = x @ vectors[:, ::-1][:, : min(3, c)]
    if components.shape[1] < 3:
        components = np.pad(components, ((0, 0), (0, 3 - components.shape[1])))
    lo, hi = np.percentile(components, 1, axis=0), np.percentile(components, 99, axis=0)
    scaled = (components - lo) / np.where(hi > lo, hi - lo, 1)
    return (np.clip(scaled, 0, 1) * 255).astype(np.uint8).reshape(h, w, 3)


def label_rgb(labels) -> np.ndarray:
    """Each label id a fixed bright colour (hashed), background 0 black."""
    ids = labels.astype(np.uint64)
    mask32 = np.uint64(0xFFFFFFFF)
    h = (ids * np.uint64(0x9E3779B1)) & mask32  # murmur3-style mixing: neighbouring ids get unrelated colours
    h = ((h ^ (h >> np.uint64(15))) * np.uint64(0x85EBCA77)) & mask32
    h ^= h >> np.uint64(13)
    rgb = np.stack([(h >> np.uint64(s)) & np.uint64(255) for s in (16, 8, 0)], axis=-1)
    rgb = (64 + rgb * 3 // 4).astype(np.uint8)
    rgb[ids == 0] = 0
    return rgb


def grey_rgb(values, lo: float, hi: float) -> np.ndarray:
    scaled = (values.astype(np.float64) - lo) / (hi - lo if hi > lo else 1)
    grey = (np.clip(scaled, 0, 1) * 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)


def feature_slice(paths: VolumePaths, metadata, context, z: int) -> np.ndarray:
    """Features (C, H, W) of slice z, float32, read by the volume's storage form."""
    form = metadata.storage_form
    _, depth, height, width = metadata.shapes["features"]
    region = [(z, z + 1), (0, height), (0, width)]
    return form.read_region(open_array(paths.array(form.array_name), context), metadata.configuration.planes, region)[:, 0]


def write_preview(output_dir: Path, index: int, preview_dir: Path, num_threads: int = 8) -> Path:
    """Middle z slice of the features (PCA as RGB), gt, mask and raw, side by side."""
    paths = VolumePaths(Path(output_dir), index)
    metadata = load_volume_metadata(paths.metadata)
    context = ts_context(num_threads)
    depth = metadata.shapes["features"][1]
    z = depth // 2
    panels = [("features PCA", pca_rgb(feature_slice(paths, metadata, context, z)))]
    if paths.array("gt").is_dir():
        panels.append(("gt", label_rgb(open_array(paths.array("gt"), context)[z].read().result())))
    if paths.array("mask").is_dir():
        panels.append(("mask", grey_rgb(open_array(paths.array("mask"), context)[z].read().result(), 0, 1)))
    if paths.array("raw").is_dir():
        raw = open_array(paths.array("raw"), context)
        factor = max(1, raw.shape[0] // depth)
        lo, hi = metadata.configuration.intensity_range or (0, 255)
        # the raw slices that area-average into label slice z
        panels.append(("raw", grey_rgb(raw[z * factor : (z + 1) * factor].read().result().mean(axis=0), lo, hi)))
    source = source_label(metadata.source_dataset.to_dict())
    header = f"{paths.name}  z {z}/{depth}  {source}"
    return write_png(preview_path(preview_dir, index), compose(panels, header, PREVIEW_PANEL_PIXELS))

