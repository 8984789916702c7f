"""Where a crop can come from (a dataset's ground-truth crop or its inference labels) and
where its window is placed in world space."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from dinov3_cache.geometry import CropGeometry
from dinov3_cache.sources.base import SamplingOptions, SourceError
from dinov3_cache.sources.cellmap.catalog import INFERENCE_CROP, Catalog, label_kind
from dinov3_cache.sources.cellmap.encoding import AnnotationEncoding
from dinov3_cache.sources.cellmap.ome_ngff import TOLERANCE, LevelArray


@dataclass(frozen=True)
class CropUnit:
    """One place a crop can come from: a dataset's ground-truth crop or its inference labels."""

    dataset: str
    crop: str
    raw: str
    labels: tuple[tuple[str, str], ...]  # (organelle, group URL) in --organelles order

    @property
    def kind(self) -> str:
        return label_kind(self.crop)


def crop_name(text: str) -> str:
    return text if text.startswith("crop") or text == INFERENCE_CROP else f"crop{text}"


def eligible_units(catalog: Catalog, options: SamplingOptions) -> list[CropUnit]:
    """Every (dataset, crop) holding all requested organelles, after the crop and inference
    filters, in a fixed order. Raises SourceError naming what is missing."""
    known = set(catalog.dataset_names())
    unknown = [d for d in options.inference_filter if d not in known]
    if unknown:
        raise SourceError(
            f"dataset(s) {', '.join(unknown)} named by --inference-filter are not in the catalog "
            f"(known: {', '.join(sorted(known)[:20])}); check the names"
        )
    absent = [o for o in options.organelles if o not in catalog.organelles()]
    if absent:
        raise SourceError(
            f"organelle(s) {', '.join(absent)} appear in no dataset of the catalog "
            f"(known: {', '.join(catalog.organelles()[:40]) or 'none'}); check --organelles"
        )
    crops = {crop_name(c) for c in options.crop_filter}
    unknown_crops = sorted(crops - {entry.crop for d in catalog.datasets for entry in d.labels})
    if unknown_crops:
        raise SourceError(f"crop(s) {', '.join(unknown_crops)} named by --crop-filter are in no dataset of the catalog; check the names")
    units = []
    for d in catalog.datasets:
        use_inference = d.name in options.inference_filter
        by_crop: dict[str, dict[str, str]] = {}
        for entry in d.labels:
            if (entry.kind == "inference") == use_inference and (use_inference or not crops or entry.crop in crops):
                by_crop.setdefault(entry.crop, {})[entry.organelle] = entry.url
        for crop, arrays in sorted(by_crop.items()):
            if all(o in arrays for o in options.organelles):
                units.append(CropUnit(d.name, crop, d.raw, tuple((o, arrays[o]) for o in options.organelles)))
    without = [d for d in options.inference_filter if not any(u.dataset == d for u in units)]
    if without:
        raise SourceError(
            f"dataset(s) {', '.join(without)} named by --inference-filter have no inference labels for all of "
            f"{', '.join(options.organelles)}; check --organelles or drop them from --inference-filter"
        )
    if not units:
        raise SourceError(
            f"no dataset has {'inference labels' if options.inference_filter else 'a ground-truth crop'} holding all of "
            f"{', '.join(options.organelles)}"
            + (f" among crops {', '.join(sorted(crops))}" if crops else "")
            + "; check --organelles, --crop-filter and --inference-filter"
        )
    return units


@dataclass
class ResolvedUnit:
    unit: CropUnit
    raw: LevelArray
    labels: dict[str, LevelArray]
    encodings: dict[str, AnnotationEncoding | None]  # per organelle; None: values as stored

    @property
    def box(self) -> tuple[np.ndarray, np.ndarray]:
        """The annotated box: where every requested label array has voxels."""
        lo = np.max([a.lo for a in self.labels.values()], axis=0)
        hi = np.min([a.hi for a in self.labels.values()], axis=0)
        return lo, hi


def window_start(resolved: ResolvedUnit, geometry: CropGeometry, gt_extension: bool, rng: np.random.Generator) -> np.ndarray | None:
    """World corner of a window on the base-resolution grid from the raw level's corner,
    inside the raw array and overlapping (or, without GT extension, inside) the box.
    None where no such window exists for this unit."""
    step, extent = geometry.base_resolution, geometry.extent_nm
    grid = resolved.raw.lo
    box_lo, box_hi = resolved.box
    start = np.empty(3)
    for axis in range(3):
        g = grid[axis]
        k_lo = math.ceil((resolved.raw.lo[axis] - g) / step - TOLERANCE)
        k_hi = math.floor((resolved.raw.hi[axis] - extent - g) / step + TOLERANCE)
        if not gt_extension:
            k_lo = max(k_lo, math.ceil((box_lo[axis] - g) / step - TOLERANCE))
            k_hi = min(k_hi, math.floor((box_hi[axis] - extent - g) / step + TOLERANCE))
        if k_lo > k_hi:
            return None
        if gt_extension:  # the window's centre falls in the box, then the window is kept inside the raw
            c_lo = math.floor((box_lo[axis] - extent / 2 - g) / step)
            c_hi = math.ceil((box_hi[axis] - extent / 2 - g) / step)
            k = min(max(int(rng.integers(c_lo, c_hi + 1)), k_lo), k_hi)
        else:
            k = int(rng.integers(k_lo, k_hi + 1))
        start[axis] = g + k * step
    return start
