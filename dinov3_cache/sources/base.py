"""Where training crops come from: the source interface, label filters and source choice.

A source turns a volume index into a `SourceCrop`: raw at slice resolution
(S^3, S = output_image_dim * base_resolution / min_resolution_for_raw), labels and an
optional valid-label mask at label resolution (D^3, D = output_image_dim), and a
description recorded as the metadata's ``source_dataset``. Same index, same options:
same crop, on any machine (each source seeds a local generator from the index).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dinov3_cache.errors import CacheToolError
from dinov3_cache.geometry import AxisTransform, CropGeometry, VoxelGrid

MAX_CANDIDATES = 100


class SourceError(CacheToolError, ValueError):
    """Bad source options or data; the message is one line a user can act on."""


@dataclass(frozen=True)
class LabelFilters:
    """The seed's acceptance filters, measured inside the valid-label mask."""

    min_label_fraction: float = 0.01
    min_unique_ids: int = 2
    min_ground_truth_fraction: float = 0.05

    def measure(self, gt: np.ndarray, mask: np.ndarray | None) -> dict:
        valid = np.ones(gt.shape, bool) if mask is None else mask.astype(bool)
        n_valid = int(valid.sum())
        inside = gt[valid]
        return {
            "ground_truth_fraction": n_valid / gt.size,
            "label_fraction": float((inside > 0).sum()) / n_valid if n_valid else 0.0,
            "unique_ids": int(np.unique(inside).size),
        }

    def passes(self, measured: dict) -> bool:
        return (
            measured["ground_truth_fraction"] >= self.min_ground_truth_fraction
            and measured["label_fraction"] >= self.min_label_fraction
            and measured["unique_ids"] >= self.min_unique_ids
        )

    def describe(self) -> str:
        return (
            f"--min-label-fraction {self.min_label_fraction}, --min-unique-ids {self.min_unique_ids}, "
            f"--min-ground-truth-fraction {self.min_ground_truth_fraction}"
        )


@dataclass(frozen=True)
class SamplingOptions:
    """What to sample, shared by every source."""

    organelles: tuple[str, ...] = ("cell",)
    filters: LabelFilters = field(default_factory=LabelFilters)
    gt_extension: bool = True
    crop_filter: tuple[str, ...] = ()
    inference_filter: tuple[str, ...] = ()

    def fingerprint_values(self) -> dict:
        return {
            "organelles": list(self.organelles),
            "filters": vars(self.filters),
            "gt_extension": self.gt_extension,
            "crop_filter": list(self.crop_filter),
            "inference_filter": list(self.inference_filter),
        }


@dataclass
class SourceCrop:
    raw: np.ndarray  # (S, S, S) at slice resolution
    gt: np.ndarray  # (D, D, D) labels
    mask: np.ndarray | None  # (D, D, D) uint8, 1 where labels are valid; None: all valid
    raw_range: tuple[float, float]  # raw intensity mapped to [0, 1] by (raw - lo) / (hi - lo)
    offset_nm: tuple[float, float, float]  # world corner (z, y, x) of the crop's bounding box
    description: dict  # metadata["source_dataset"]; its "world_transform" says where stored voxels sit
    geometry: CropGeometry  # the resolutions and size the crop was sampled at

    @property
    def label_grid(self) -> VoxelGrid:
        """Grid of the features, gt and mask (the bounding box; see world_transform)."""
        return self.geometry.label_grid(self.offset_nm)

    @property
    def raw_grid(self) -> VoxelGrid:
        return self.geometry.raw_grid(self.offset_nm)

    @property
    def world_transform(self) -> AxisTransform:
        """Which world voxel each stored index shows (identity unless augmented)."""
        return AxisTransform.from_record(self.description.get("world_transform"))

    def record_world_transform(self, transform: AxisTransform) -> None:
        self.description["world_transform"] = transform.to_record({"labels": self.label_grid, "raw": self.raw_grid})


class VolumeSource(ABC):
    """Turns a volume index into a crop. Implementations own their data access."""

    name: str

    @abstractmethod
    def sample(self, volume_index: int, geometry: CropGeometry, options: SamplingOptions) -> SourceCrop:
        """The crop for this index; raises SourceError with one actionable line."""

    def fingerprint_values(self) -> dict:
        """What identifies the data (it decides the feature values)."""
        return {"source": self.name}


def combine_organelle_labels(
    per_organelle: dict[str, np.ndarray], organelles: tuple[str, ...]
) -> np.ndarray:
    """One organelle keeps its instance ids; several become class indices 1..n in the
    given order, 0 background, and where organelles overlap the later one wins."""
    if len(organelles) == 1:
        return per_organelle[organelles[0]]
    first = per_organelle[organelles[0]]
    classes = np.zeros(first.shape, np.uint8 if len(organelles) < 256 else np.uint16)
    for class_index, organelle in enumerate(organelles, start=1):
        classes[per_organelle[organelle] > 0] = class_index
    return classes


def draw_passing_crop(
    volume_index: int,
    options: SamplingOptions,
    draw_candidate: Callable[[np.random.Generator], SourceCrop],
    seed_offset: int = 0,
) -> SourceCrop:
    """Draw candidates from an index-seeded generator until one passes the filters."""
    rng = np.random.default_rng([volume_index, seed_offset])
    seen = []
    for attempt in range(MAX_CANDIDATES):
        crop = draw_candidate(rng)
        measured = options.filters.measure(crop.gt, crop.mask)
        if options.filters.passes(measured):
            crop.description["candidate_attempt"] = attempt
            crop.description["filter_measurements"] = measured
            return crop
        seen.append(measured)
    best = max(seen, key=lambda m: (m["label_fraction"], m["unique_ids"]))
    raise SourceError(
        f"volume {volume_index}: none of {MAX_CANDIDATES} candidate crops passed the filters "
        f"({options.filters.describe()}); best seen: label fraction {best['label_fraction']:.4f}, "
        f"{best['unique_ids']} unique ids, ground-truth fraction {best['ground_truth_fraction']:.3f}. "
        "Relax the filters or choose other organelles."
    )


def _synthetic_from_args(args: Any) -> VolumeSource:
    from dinov3_cache.sources.synthetic import SyntheticSource

    return SyntheticSource()


def _cellmap_from_args(args: Any) -> VolumeSource:
    from dinov3_cache.sources.cellmap import source_from_args  # on use: it imports this module

    return source_from_args(args)


# --source name -> the source built from preprocess_volume.py options
SOURCES: dict[str, Callable[[Any], VolumeSource]] = {"cellmap": _cellmap_from_args, "synthetic": _synthetic_from_args}
DATA_ROOT_ENV = "DINOV3_DATA_ROOT"


def source_name_from_args(args: Any) -> str:
    """--source, else 'cellmap' when --data-root, --catalog or $DINOV3_DATA_ROOT gives data."""
    if args.source is not None:
        if args.source not in SOURCES:
            raise SourceError(f"unknown --source {args.source!r}; choose from {', '.join(sorted(SOURCES))}")
        return args.source
    if getattr(args, "data_root", None) or getattr(args, "catalog", None) or os.environ.get(DATA_ROOT_ENV):
        return "cellmap"
    raise SourceError(
        f"no data source given: pass --data-root ROOT (or set {DATA_ROOT_ENV}) or --catalog FILE for CellMap data, "
        "or --source synthetic for the built-in demo data"
    )


def source_from_args(args: Any) -> VolumeSource:
    """The source that preprocess_volume.py options ask for (the one way to choose one)."""
    return SOURCES[source_name_from_args(args)](args)
