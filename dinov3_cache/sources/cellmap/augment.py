"""Augmentation seeded by the volume index: one axis transform of raw, labels and mask
(recorded as the crop's world transform) and a monotone intensity change of raw."""

from __future__ import annotations

import numpy as np

from dinov3_cache.geometry import AxisTransform
from dinov3_cache.sources.base import SourceCrop

AUGMENT_STREAM = 1  # draw_passing_crop uses stream 0 of the index's generator


def draw_augmentation(volume_index: int) -> dict:
    """Flips, an axis order (together every 90-degree rotation and axis swap of the cube)
    and an intensity change, from the index's own generator stream."""
    rng = np.random.default_rng([volume_index, AUGMENT_STREAM])
    return {
        "axis_order": [int(a) for a in rng.permutation(3)],
        "flip": [bool(f) for f in rng.integers(0, 2, 3)],
        "contrast": round(float(rng.uniform(0.8, 1.2)), 6),
        "brightness": round(float(rng.uniform(-0.1, 0.1)), 6),
        "gamma": round(float(np.exp(rng.uniform(np.log(0.8), np.log(1.25)))), 6),
        "order": "transpose to axis_order, then flip, then intensity: ((x - 0.5) * contrast + 0.5 + brightness) ** gamma on [0, 1]",
    }


def axis_transform(params: dict) -> AxisTransform:
    """The flips and axis order of drawn augmentation parameters."""
    return AxisTransform(tuple(params["axis_order"]), tuple(params["flip"]))


def transform_geometry(array: np.ndarray | None, params: dict) -> np.ndarray | None:
    return None if array is None else axis_transform(params).apply(array)


def transform_intensity(raw: np.ndarray, raw_range: tuple[float, float], params: dict) -> np.ndarray:
    """The same monotone map for every voxel; it never looks at the labels."""
    lo, hi = raw_range

    def curve(x: np.ndarray) -> np.ndarray:
        unit = np.clip((x.astype(np.float64) - lo) / (hi - lo), 0, 1)
        unit = np.clip((unit - 0.5) * params["contrast"] + 0.5 + params["brightness"], 0, 1) ** params["gamma"]
        return unit * (hi - lo) + lo

    if raw.dtype in (np.uint8, np.uint16):  # a lookup table: one pass over the voxels
        table = np.rint(curve(np.arange(np.iinfo(raw.dtype).max + 1))).astype(raw.dtype)
        return table[raw]
    return curve(raw).astype(raw.dtype)


def augment_crop(crop: SourceCrop, volume_index: int) -> SourceCrop:
    params = draw_augmentation(volume_index)
    crop.raw = transform_intensity(transform_geometry(crop.raw, params), crop.raw_range, params)
    crop.gt = transform_geometry(crop.gt, params)
    crop.mask = transform_geometry(crop.mask, params)
    crop.description["augmentation"] = params
    crop.record_world_transform(axis_transform(params))
    return crop
