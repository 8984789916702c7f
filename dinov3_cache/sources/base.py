"""Where training crops come from: the source interface (`VolumeSource`), the options a
source declares (`SourceOption`) and the label filters every source applies.

A source turns a volume index into a `SourceCrop`: raw at slice resolution
(S^3, S = output_image_dim * base_resolution / min_resolution_for_raw), labels and an
optional valid-label mask at label resolution (D^3, D = output_image_dim), and a
description recorded as the metadata's ``source_dataset``. Same index, same options:
same crop, on any machine (each source seeds a local generator from the index).

A source also declares its own command-line options, builds itself from a plain mapping of
option values (by argparse dest) and checks the options before any job runs (`preflight`);
`registry.py` lists the sources and is the one place that chooses among them.
"""

from __future__ import annotations

import argparse
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dinov3_cache.errors import CacheToolError
from dinov3_cache.geometry import AxisTransform, CropGeometry, VoxelGrid
from dinov3_cache.sources.signatures import UNREACHABLE, SourceStatus

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
    # the source's signature of what this candidate read, made only for the candidate kept
    signing: Callable[[], dict] | None = field(default=None, repr=False)

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


@dataclass(frozen=True)
class SourceOption:
    """One command-line option of a source, declared once: its flag and add_argument keywords
    (help and default included). `pass_through`: every job receives it (the submission's
    settings file holds it); `locates_data`: it says where the source data is, so tools that
    read the data again (the viewer) take it too."""

    flag: str
    kwargs: Mapping[str, Any]
    pass_through: bool = True
    locates_data: bool = False

    @property
    def dest(self) -> str:
        return self.flag.removeprefix("--").replace("-", "_")

    def add_to(self, parser: Any, help_prefix: str = "") -> argparse.Action:
        """add_argument on a parser or an argument group; help_prefix says where the option applies."""
        kwargs = dict(self.kwargs)
        if help_prefix and kwargs.get("help"):
            kwargs["help"] = help_prefix + kwargs["help"]
        return parser.add_argument(self.flag, **kwargs)


class VolumeSource(ABC):
    """Turns a volume index into a crop. Implementations own their data access, their
    options (`options`), how they are built from option values (`from_settings`) and the
    checks made before jobs start (`preflight`)."""

    name: str
    summary: str = ""  # --source help: '<name>' (<summary>)
    choice_hint: str = ""  # how a user chooses it, for the 'no data source given' line
    options: tuple[SourceOption, ...] = ()
    # building it writes into the output directory (a dry run then does not build it)
    writes_when_built: bool = False

    @classmethod
    def implied_by(cls, settings: Mapping[str, Any]) -> bool:
        """Whether these option values choose this source without --source."""
        return False

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> VolumeSource:
        """The source that these option values (by argparse dest) ask for; every registered
        source provides it (a source made in code alone, as in a benchmark, need not)."""
        raise NotImplementedError(f"{cls.__name__} is not built from options")

    @abstractmethod
    def sample(self, volume_index: int, geometry: CropGeometry, options: SamplingOptions) -> SourceCrop:
        """The crop for this index; raises SourceError with one actionable line."""

    def preflight(self, options: SamplingOptions, geometry: CropGeometry) -> None:  # noqa: B027 - most sources check in sample
        """Refuse, with one SourceError line, options that would make every sample fail;
        called once before jobs are submitted. Cheap: no crop is read."""

    def fingerprint_values(self) -> dict:
        """What identifies the data (it decides the feature values)."""
        return {"source": self.name}

    @classmethod
    def viewer_layers(cls, record: Mapping[str, Any], settings: Mapping[str, Any]) -> tuple[list, Any]:
        """(layers, origin) the viewer shows under a volume whose `source_dataset` is `record`,
        found through these option values (`sources.viewer`); SourceError when unreachable."""
        raise SourceError(f"a {cls.name} volume has no source data to show")

    @classmethod
    def for_checking(cls, settings: Mapping[str, Any]) -> VolumeSource:
        """The source that re-checks the signatures it recorded (--check-sources); SourceError
        with one line when the option values do not say where its data is. Writes nothing."""
        return cls.from_settings(settings)

    def check_signature(self, signature: dict, description: dict) -> SourceStatus:
        """Compare a signature this source recorded (metadata source_dataset.signature) with
        the source now, reading metadata, listings or ETags and the touched chunks only, never
        more than the crop. SignatureError when the record is malformed (damage)."""
        return SourceStatus(UNREACHABLE, f"the {self.name} source cannot re-check its signatures")


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


def source_name_from_args(args: Any) -> str:
    """The source parsed options choose (registry.source_name for a Namespace)."""
    from dinov3_cache.sources.registry import source_name  # on use: the registry imports every source

    return source_name(vars(args))


def source_from_args(args: Any) -> VolumeSource:
    """The source parsed options ask for (registry.source_from_settings for a Namespace)."""
    from dinov3_cache.sources.registry import source_from_settings

    return source_from_settings(vars(args))
