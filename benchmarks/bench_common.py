"""Helpers shared by the benchmarks."""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Callable

from dinov3_cache.sources.base import CropGeometry, SamplingOptions, SourceCrop, VolumeSource


class FixedSource(VolumeSource):
    """Hands out one pre-made crop, so a benchmark times the pipeline and not the source."""

    name = "fixed"

    def __init__(self, crop: SourceCrop):
        self.crop = crop

    def sample(self, volume_index: int, geometry: CropGeometry, options: SamplingOptions) -> SourceCrop:
        return self.crop


def host_seconds(fn: Callable[[], object]) -> float:
    """Wall seconds of one call, by the host clock."""
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    return statistics.median(host_seconds(fn) for _ in range(repeats))


def peak_rss_gb_of_children() -> float:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / 1e9
