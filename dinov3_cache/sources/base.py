"""Where training crops come from: a small interface and the built-in synthetic source.

A source turns a volume index into a `SourceCrop`: raw at slice resolution
(S^3, S = output_image_dim * base_resolution / min_resolution_for_raw), labels and an
optional valid-label mask at label resolution (D^3, D = output_image_dim), and a
description recorded as the metadata's ``source_dataset``. Same index, same options:
same crop, on any machine (each source seeds a local generator from the index).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from dinov3_cache.errors import CacheToolError
from dinov3_cache.geometry import CropGeometry

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
    offset_nm: tuple[float, float, float]  # world offset (z, y, x) of the crop's first voxel corner
    description: dict  # metadata["source_dataset"]


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


# ----------------------------------------------------------------------------- synthetic


class SyntheticSource(VolumeSource):
    """A deterministic EM-like world per volume index, so everything runs offline.

    Cells are Voronoi regions with dark membranes and textured cytoplasm; some hold a
    nucleus (``nuc``); mitochondria (``mito``) are small dark ellipsoids with cristae.
    Labels: ``cell`` (instances), ``nuc`` (instances), ``mito`` (instances).
    """

    name = "synthetic"
    ORGANELLES = ("cell", "nuc", "mito")

    def sample(self, volume_index: int, geometry: CropGeometry, options: SamplingOptions) -> SourceCrop:
        unknown = [o for o in options.organelles if o not in self.ORGANELLES]
        if unknown:
            raise SourceError(
                f"unknown organelle(s) {', '.join(unknown)} for --source synthetic; "
                f"choose from {', '.join(self.ORGANELLES)}"
            )
        if options.crop_filter or options.inference_filter:
            raise SourceError("--crop-filter and --inference-filter name real datasets; --source synthetic has none")
        return draw_passing_crop(
            volume_index, options, lambda rng: self._draw(volume_index, rng, geometry, options)
        )

    def _draw(
        self, volume_index: int, rng: np.random.Generator, geometry: CropGeometry, options: SamplingOptions
    ) -> SourceCrop:
        world = SyntheticWorld(rng, geometry.extent_nm)
        raw = world.render_raw(geometry.slice_size, rng)
        labels = world.labels(geometry.output_image_dim)
        gt = combine_organelle_labels(labels, options.organelles)
        mask = None
        if options.gt_extension:
            mask = annotated_box_mask(rng, gt.shape)
            gt = gt * mask.astype(gt.dtype)
        return SourceCrop(
            raw=raw,
            gt=gt,
            mask=mask,
            raw_range=(0.0, 255.0),
            offset_nm=(0.0, 0.0, 0.0),
            description={
                "index": volume_index,
                "name": "synthetic",
                "paths": {"raw": f"synthetic://{volume_index}/raw"}
                | {o: f"synthetic://{volume_index}/{o}" for o in options.organelles},
                "voxel_size_nm": {"raw": [geometry.min_resolution_for_raw] * 3, "labels": [geometry.base_resolution] * 3},
                "offset_nm": [0.0, 0.0, 0.0],
            },
        )


def annotated_box_mask(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """A random annotated box covering 60-100 % of each axis: GT extension reaches past it."""
    mask = np.zeros(shape, np.uint8)
    box = []
    for n in shape:
        length = int(rng.integers(int(0.6 * n), n + 1))
        start = int(rng.integers(0, n - length + 1))
        box.append(slice(start, start + length))
    mask[tuple(box)] = 1
    return mask


class SyntheticWorld:
    """Geometry of one synthetic volume in world units (nm), evaluated on any grid."""

    def __init__(self, rng: np.random.Generator, extent: float):
        self.extent = extent
        n_cells = int(rng.integers(6, 14))
        margin = 0.25 * extent
        self.cell_centres = rng.uniform(-margin, extent + margin, (n_cells, 3))
        cell_radius = extent / n_cells ** (1 / 3)
        self.membrane_nm = 0.02 * extent
        self.has_nucleus = rng.random(n_cells) < 0.6
        self.nucleus_radius = rng.uniform(0.25, 0.4, n_cells) * cell_radius
        n_mito = int(rng.integers(8, 20))
        self.mito_centres = rng.uniform(0, extent, (n_mito, 3))
        self.mito_radii = rng.uniform(0.03, 0.07, (n_mito, 3)) * extent
        self.texture = rng.standard_normal((12, 12, 12)).astype(np.float32)
        self.cristae_phase = rng.uniform(0, 2 * np.pi)

    def _fields(self, n: int, z_lo: int = 0, z_hi: int | None = None) -> dict[str, np.ndarray]:
        """Cell id, membrane, nucleus id and mito id on an n^3 grid (rows z_lo:z_hi)."""
        z_hi = n if z_hi is None else z_hi
        step = self.extent / n
        zc = ((np.arange(z_lo, z_hi) + 0.5) * step)[:, None, None]
        yc = ((np.arange(n) + 0.5) * step)[None, :, None]
        xc = yc.reshape(1, 1, n)
        shape = (z_hi - z_lo, n, n)
        nearest = np.full(shape, np.inf, np.float32)
        second = np.full(shape, np.inf, np.float32)
        cell = np.zeros(shape, np.uint32)
        for i, (cz, cy, cx) in enumerate(self.cell_centres):
            d = np.sqrt(((zc - cz) ** 2 + (yc - cy) ** 2 + (xc - cx) ** 2).astype(np.float32))
            closer = d < nearest
            second = np.where(closer, nearest, np.minimum(second, d))
            nearest = np.where(closer, d, nearest)
            cell[closer] = i + 1
        membrane = (second - nearest) < self.membrane_nm
        nucleus = np.zeros(shape, np.uint32)
        for i, (cz, cy, cx) in enumerate(self.cell_centres):
            if self.has_nucleus[i]:
                d2 = (zc - cz) ** 2 + (yc - cy) ** 2 + (xc - cx) ** 2
                nucleus[(d2 < self.nucleus_radius[i] ** 2) & (cell == i + 1) & ~membrane] = i + 1
        mito = np.zeros(shape, np.uint32)
        mito_shell = np.zeros(shape, bool)
        for i, ((mz, my, mx), (rz, ry, rx)) in enumerate(zip(self.mito_centres, self.mito_radii)):
            q = ((zc - mz) / rz) ** 2 + ((yc - my) / ry) ** 2 + ((xc - mx) / rx) ** 2
            inside = (q < 1) & (nucleus == 0) & ~membrane
            mito[inside] = i + 1
            mito_shell |= inside & (q > 0.7)
        cell[membrane] = 0
        return {"cell": cell, "membrane": membrane, "nuc": nucleus, "mito": mito, "mito_shell": mito_shell}

    def labels(self, n: int) -> dict[str, np.ndarray]:
        fields = self._fields(n)
        return {k: fields[k] for k in SyntheticSource.ORGANELLES}

    def render_raw(self, n: int, rng: np.random.Generator, rows_per_block: int = 32) -> np.ndarray:
        raw = np.empty((n, n, n), np.uint8)
        texture = smooth_noise(self.texture, n)
        for z0 in range(0, n, rows_per_block):
            z1 = min(n, z0 + rows_per_block)
            f = self._fields(n, z0, z1)
            tex = texture[z0:z1]
            value = 160 + 25 * tex
            value = np.where(f["nuc"] > 0, 120 + 15 * tex, value)
            z = np.arange(z0, z1, dtype=np.float32)[:, None, None] * (self.extent / n)
            cristae = np.sin(z / (0.01 * self.extent) + self.cristae_phase)
            value = np.where(f["mito"] > 0, 95 + 25 * cristae, value)
            value = np.where(f["mito_shell"], 55, value)
            value = np.where(f["membrane"], 40, value)
            value = value + rng.normal(0, 10, value.shape)
            raw[z0:z1] = np.clip(value, 0, 255).astype(np.uint8)
        return raw


def smooth_noise(coarse: np.ndarray, n: int) -> np.ndarray:
    """Trilinear upsampling of a coarse random grid to n^3: a smooth cytoplasm texture."""
    import torch
    import torch.nn.functional as F

    grid = torch.from_numpy(coarse)[None, None]
    return F.interpolate(grid, size=(n, n, n), mode="trilinear", align_corners=False)[0, 0].numpy()


def _cellmap_source(**options: Any) -> VolumeSource:
    from dinov3_cache.sources.cellmap import CellMapSource  # imported on use: cellmap_source imports this module

    return CellMapSource(**options)


SOURCES: dict[str, Callable[..., VolumeSource]] = {"synthetic": SyntheticSource, "cellmap": _cellmap_source}
DATA_ROOT_ENV = "DINOV3_DATA_ROOT"


def make_source(name: str, **options: Any) -> VolumeSource:
    if name not in SOURCES:
        raise SourceError(f"unknown --source {name!r}; choose from {', '.join(sorted(SOURCES))}")
    return SOURCES[name](**options)


def source_name_from_args(args: Any) -> str:
    """--source, else 'cellmap' when --data-root, --catalog or $DINOV3_DATA_ROOT gives data."""
    if args.source is not None:
        return args.source
    if getattr(args, "data_root", None) or getattr(args, "catalog", None) or os.environ.get(DATA_ROOT_ENV):
        return "cellmap"
    raise SourceError(
        f"no data source given: pass --data-root ROOT (or set {DATA_ROOT_ENV}) or --catalog FILE for CellMap data, "
        "or --source synthetic for the built-in demo data"
    )


def source_from_args(args: Any) -> VolumeSource:
    """The source that preprocess_volume.py options ask for."""
    name = source_name_from_args(args)
    if name == "cellmap":
        from dinov3_cache.sources.cellmap import source_from_args as cellmap_source_from_args

        return cellmap_source_from_args(args)
    return make_source(name)
