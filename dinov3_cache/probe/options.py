"""What a probe run is asked to do, and the checks that refuse bad input before any training:
the caches, the train and test volumes, the classes and the geometry they share."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dinov3_cache.errors import CacheToolError, UsageError
from dinov3_cache.indices import format_ranges, parse_index_list
from dinov3_cache.loader.volumes import CachedVolume, find_volumes
from dinov3_cache.zarr_arrays import open_array, ts_context

DEFAULT_STEPS = 200
DEFAULT_CROP = 32
IGNORE = -1  # target value of voxels whose labels are unknown (outside the mask)


@dataclass(frozen=True)
class ProbeOptions:
    """The probe's settings; the command line and run_probe() both build one."""

    caches: tuple[Path, ...]
    train_indices: tuple[int, ...] | None = None  # default: all committed volumes but the test ones
    test_indices: tuple[int, ...] | None = None  # default: the last quarter (at least one)
    crop_size: tuple[int, int, int] | None = None  # default: 32^3, or the volume when smaller
    steps: int = DEFAULT_STEPS
    batch_size: int = 2
    learning_rate: float = 0.02
    seed: int = 0
    device: str = "cpu"
    num_threads: int = 4


@dataclass(frozen=True)
class Classes:
    """Class names and how stored labels become class indices: several organelles are
    stored as classes 1..n already; one organelle holds instance ids (foreground > 0)."""

    names: tuple[str, ...]
    instances: bool

    @classmethod
    def of(cls, organelles: Sequence[str]) -> Classes:
        return cls(("background", *organelles), instances=len(organelles) == 1)

    def target(self, gt, mask):
        """Class index per voxel (numpy or torch, a new array), IGNORE where the mask says unknown."""
        if isinstance(gt, np.ndarray):
            target = (gt > 0).astype(np.int64) if self.instances else gt.astype(np.int64)
        else:
            target = (gt > 0).long() if self.instances else gt.to(dtype=torch.int64, copy=True)
        if mask is not None:
            target[mask == 0] = IGNORE
        return target


@dataclass(frozen=True)
class ProbePlan:
    """The checked run: each cache's train and test volumes, the shared classes and crop,
    and the training labels' class counts (for the class weights and the majority class)."""

    options: ProbeOptions
    names: tuple[str, ...]
    train: dict[Path, list[CachedVolume]]
    test: dict[Path, list[CachedVolume]]
    classes: Classes
    crop_size: tuple[int, int, int]
    class_counts: np.ndarray


def parse_indices(text: Sequence[str] | None, option: str) -> tuple[int, ...] | None:
    return None if text is None else tuple(parse_index_list(text, option))


def cache_names(caches: Sequence[Path]) -> tuple[str, ...]:
    """Each cache's directory name, or its whole path where two names are the same."""
    names = [Path(c).name or str(c) for c in caches]
    return tuple(n if names.count(n) == 1 else str(c) for n, c in zip(names, caches, strict=True))


def plan_probe(options: ProbeOptions) -> ProbePlan:
    """Check everything a run needs before it reads a feature; UsageError says what is wrong."""
    if not options.caches:
        raise UsageError("give at least one cache directory with --cache")
    if len(set(map(Path.resolve, map(Path, options.caches)))) != len(options.caches):
        raise UsageError("a cache is given twice in --cache")
    if options.steps < 1:
        raise UsageError(f"--steps must be at least 1, got {options.steps}")
    if options.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {options.batch_size}")
    if options.seed < 0:
        raise UsageError(f"--seed must be >= 0, got {options.seed}")
    caches = [Path(c) for c in options.caches]
    train_ix, test_ix = split_indices(caches[0], options)
    train = {c: visible_volumes(c, train_ix, "--train-indices") for c in caches}
    test = {c: visible_volumes(c, test_ix, "--test-indices") for c in caches}
    first = train[caches[0]][0]
    classes = Classes.of(first.metadata.configuration.organelles)
    for cache in caches:
        check_same_kind(cache, first, train[cache] + test[cache], classes, caches[0])
        check_same_labels(cache, train[cache] + test[cache], train[caches[0]] + test[caches[0]], caches[0])
    crop = check_crop(options.crop_size, first.spatial_shape)
    counts = class_counts(train[caches[0]], classes, options.num_threads)
    absent = [name for name, n in zip(classes.names, counts, strict=True) if n == 0]
    if absent:
        raise UsageError(
            f"class {', '.join(absent)} has no labelled voxel in the training volumes {format_ranges(train_ix)} of "
            f"{caches[0]}; add volumes that hold it to --train-indices"
        )
    return ProbePlan(options, cache_names(caches), train, test, classes, crop, counts)


def split_indices(cache: Path, options: ProbeOptions) -> tuple[list[int], list[int]]:
    """The train and test indices: as given, else the committed volumes split 3:1."""
    committed = [v.index for v in visible_volumes(cache, None, "--cache")]
    if options.test_indices is not None:
        test = list(options.test_indices)
    else:  # the last quarter, at least one, as long as one volume is left to train on
        test = committed[len(committed) - max(1, len(committed) // 4):] if len(committed) > 1 else []
    if not test:
        raise UsageError(
            f"no test volumes: {cache} holds {len(committed)} committed volume(s); a probe needs at least one "
            "to train on and one to test on (--train-indices, --test-indices)"
        )
    train = list(options.train_indices) if options.train_indices is not None else [i for i in committed if i not in test]
    if not train:
        raise UsageError(f"no training volumes in {cache} besides the test volumes {format_ranges(test)}; give --train-indices")
    overlap = sorted(set(train) & set(test))
    if overlap:
        raise UsageError(
            f"volumes {format_ranges(overlap)} are in both --train-indices and --test-indices: a probe tested on "
            "its training volumes overstates what the features are worth"
        )
    return train, test


def visible_volumes(cache: Path, indices: Sequence[int] | None, option: str) -> list[CachedVolume]:
    """The loader's view of the cache (its own checks and messages), as bad input."""
    try:
        return find_volumes(cache, indices)
    except CacheToolError as e:
        raise UsageError(f"{option}: {e}") from None


def check_same_kind(cache: Path, first: CachedVolume, volumes: list[CachedVolume], classes: Classes, first_cache: Path) -> None:
    """Side-by-side caches must hold the same classes and geometry (else their scores do not compare)."""
    for volume in volumes:
        organelles = Classes.of(volume.metadata.configuration.organelles)
        if organelles != classes:
            raise UsageError(
                f"{cache} volume {volume.index} has classes {', '.join(organelles.names)} but {first_cache} has "
                f"{', '.join(classes.names)}; compare caches extracted with the same --organelles"
            )
        ours, theirs = geometry_of(volume), geometry_of(first)
        if ours != theirs:
            raise UsageError(
                f"{cache} volume {volume.index} has geometry {ours} but {first_cache} volume {first.index} has "
                f"{theirs}; compare caches of the same --output-image-dim and --base-resolution"
            )


def check_same_labels(cache: Path, volumes: list[CachedVolume], reference: list[CachedVolume], first_cache: Path) -> None:
    """Side-by-side caches must label the same volumes alike (their recorded label checksums agree)."""
    for volume, other in zip(volumes, reference, strict=True):
        ours, theirs = (v.metadata.integrity for v in (volume, other))
        if ours is None or theirs is None or ours.chunks.get("gt") != theirs.chunks.get("gt"):
            continue  # nothing recorded to compare
        if ours.crc32.get("gt") != theirs.crc32.get("gt"):
            raise UsageError(
                f"{cache} and {first_cache} hold different labels for volume {volume.index}; compare caches "
                "of the same volumes (same source, indices and --organelles)"
            )


def geometry_of(volume: CachedVolume) -> str:
    config = volume.metadata.configuration
    return f"{'x'.join(map(str, volume.spatial_shape))} voxels of {config.base_resolution:g} nm"


def check_crop(crop_size: Sequence[int] | None, volume_shape: Sequence[int]) -> tuple[int, int, int]:
    if crop_size is None:
        return tuple(min(DEFAULT_CROP, s) for s in volume_shape)
    crop = tuple(int(c) for c in crop_size)
    if len(crop) != 3 or min(crop) < 1:
        raise UsageError(f"--crop-size needs 3 positive integers (d h w), got {list(crop_size)}")
    if any(c > s for c, s in zip(crop, volume_shape, strict=True)):
        raise UsageError(f"--crop-size {list(crop)} does not fit the volumes ({list(volume_shape)}); choose a smaller crop")
    return crop


def read_labels(volume: CachedVolume, context=None) -> tuple[np.ndarray, np.ndarray | None]:
    """A volume's stored labels and mask (small: no features), for class counts and baselines."""
    gt = open_array(volume.array_path("gt"), context)[...].read().result()
    mask = open_array(volume.array_path("mask"), context)[...].read().result() if volume.has_mask else None
    return gt, mask


def class_counts(volumes: Sequence[CachedVolume], classes: Classes, num_threads: int) -> np.ndarray:
    context = ts_context(num_threads)
    counts = np.zeros(len(classes.names), np.int64)
    for volume in volumes:
        target = classes.target(*read_labels(volume, context))
        counts += np.bincount(target[target >= 0].ravel(), minlength=len(counts))[: len(counts)]
    return counts
