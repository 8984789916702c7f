"""DINOv3 feature extraction for one volume, streamed into a TensorStore cache: the
orchestration of one run.

The pipeline, per volume:

1. A source turns the index into a crop: raw at slice resolution (S^3) and labels (D^3).
2. For each plane (xy, xz, yz) the raw is area-averaged along the plane's normal to D
   slices of S x S, normalised, and run through the ViT in batches (features.py).
3. Dense layout: grids are upsampled bilinearly (align_corners=False) to D x D and the planes
   averaged into features (C, D, H, W), slab by slab (upsampling.py, writer.py); tokens
   layout: the grids themselves are stored (--layout).
4. Each block is written asynchronously while the next ones are computed (writer.py).
5. Arrays are written under OUT/volume_XXXXXX.partial/ and committed (commit_protocol.py): the
   metadata file (metadata.py) is the single commit point. The volume is extracted
   (`start_volume`), then finished (`ExtractedVolume.finish`: the last writes and the
   commit), so that a process of several volumes commits one while computing the next (multi.py).

The model itself (loading, the forward pass, the weights' identity) lives in model.py.
"""

from __future__ import annotations

import logging
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from functools import partial

from dinov3_cache.commit_protocol import commit_volume, names_commit, remove_abandoned_tree, repair_status, tidy_volume
from dinov3_cache.disk import bytes_on_disk
from dinov3_cache.errors import named_first_line
from dinov3_cache.extraction.commit import (
    VolumeOutcome,
    as_storage_error,
    disk_full_as_one_line,
    ensure_free_space,
    ensure_writable,
    existing_volume_check,
)
from dinov3_cache.extraction.config import ExtractionConfig, check_slice_size
from dinov3_cache.extraction.metadata import FeatureStatistics, volume_metadata
from dinov3_cache.extraction.model import ExecutionOptions, LoadedModel, load_model
from dinov3_cache.extraction.signals import hold_signals
from dinov3_cache.extraction.writer import AsyncBlockWriter, StagedArrays, stage_arrays, write_features, write_label_arrays
from dinov3_cache.locks import VolumeLock
from dinov3_cache.paths import VolumePaths
from dinov3_cache.records import now_iso, write_status, write_status_or_remove
from dinov3_cache.schema import VolumeMetadata
from dinov3_cache.sources.base import SourceCrop, VolumeSource
from dinov3_cache.zarr_arrays import ts_context

log = logging.getLogger("dinov3_preprocessing")

LOG_EVERY_SECONDS = 30.0


class Progress:
    """A tqdm bar on a terminal; plain periodic lines in a log file."""

    def __init__(self, total: int, label: str):
        self.total, self.done, self.label = total, 0, label
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=label, unit="slice", leave=False)
        self.started = self.last_line = time.perf_counter()

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.perf_counter()
        if now - self.last_line >= LOG_EVERY_SECONDS or self.done == self.total:
            rate = self.done / max(now - self.started, 1e-9)
            print(f"{self.label}: {self.done}/{self.total} slices ({rate:.1f} slices/s)", file=sys.stderr, flush=True)
            self.last_line = now

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class ModelOnDemand:
    """The run's model, loaded at most once, when first needed (the skip check needs it only
    when the weights' identity cannot be resolved without loading them)."""

    def __init__(self, config: ExtractionConfig, loaded: LoadedModel | None, execution: ExecutionOptions = ExecutionOptions()):
        self.config, self.loaded, self.execution, self.load_seconds = config, loaded, execution, 0.0

    def get(self) -> LoadedModel:
        if self.loaded is None:
            started = time.perf_counter()
            self.loaded = load_model(self.config.model_id, self.config.model_revision, self.config.device, self.execution)
            self.load_seconds = time.perf_counter() - started
        return self.loaded

    def take_load_seconds(self) -> float:
        """The load time, reported once: by the first volume that needed the model."""
        seconds, self.load_seconds = self.load_seconds, 0.0
        return seconds


def preprocess_volume(
    config: ExtractionConfig,
    source: VolumeSource,
    loaded: LoadedModel | None = None,
) -> VolumeOutcome:
    """Extract, write and commit one volume, under its lock. Raises PreprocessingError,
    SourceError or StorageError with an actionable one-line message."""
    started = start_volume(config, source, ModelOnDemand(config, loaded), partial(read_now, source, config))
    return started.finish() if isinstance(started, ExtractedVolume) else started


def read_now(source: VolumeSource, config: ExtractionConfig) -> SourceCrop:
    """The volume's crop, read in this thread."""
    return source.sample(config.volume_index, config.geometry, config.sampling)


def start_volume(
    config: ExtractionConfig, source: VolumeSource, model: ModelOnDemand, read_crop: Callable[[], SourceCrop]
) -> VolumeOutcome | ExtractedVolume:
    """Under the volume's lock: tidy, skip a complete volume, else compute its features and
    start their writes. The lock passes to the ExtractedVolume returned, which must be
    finished (or abandoned): the last writes and the commit can then overlap the next volume."""
    paths = config.paths
    ensure_writable(paths.output_dir)
    with disk_full_as_one_line(paths), ExitStack() as lock:
        lock.enter_context(VolumeLock(paths))
        tidy_volume(paths)
        skip = existing_volume_check(config, source, load_model=model.get)
        if skip is not None:
            hold_signals()  # the volume is complete: this job exits 0
            said = repair_status(paths)
            if said is not None:
                log.info("volume %d is committed; its status record said %s: now complete", config.volume_index, said)
            return skip
        write_status(paths, "running", started=now_iso())
        with failure_recorded(paths):
            extracted = extract(config, source, model, read_crop)
        extracted.lock = lock.pop_all()
        return extracted


@contextmanager
def failure_recorded(paths: VolumePaths, commit_id: str | None = None) -> Iterator[None]:
    """A failure inside removes the staged arrays and is written to the status record; but
    once commit `commit_id` is the volume, whatever stops the run (a library caller's Ctrl-C
    during the tidy-up) leaves it complete, and its record says so."""
    try:
        yield
    except BaseException as caught:
        if commit_id is not None and names_commit(paths, commit_id):
            write_complete_status(paths)
            raise
        e = record_failure(paths, caught)
        if e is not caught:
            raise e from None
        raise


def record_failure(paths: VolumePaths, caught: BaseException) -> BaseException:
    """Remove the staged arrays and record the failure; returns the error as the user sees it
    (a full file system as one line)."""
    e = as_storage_error(caught, paths)
    remove_abandoned_tree(paths.staging)  # first: it frees the space the status record needs
    unwritten = write_status_or_remove(paths, "failed", finished=now_iso(), error=named_first_line(e))
    if unwritten is not None:
        log.warning("volume %d: its status record could not be written (%s); removed it", paths.volume_index,
                    unwritten.strerror)
    return e


def write_complete_status(paths: VolumePaths, **fields) -> None:
    """The status record of a committed volume; one that cannot be written is a warning."""
    unwritten = write_status_or_remove(paths, "complete", finished=now_iso(), **fields)
    if unwritten is not None:
        log.warning("volume %d is complete, but its status record could not be written (%s); removed it "
                    "(a rerun of the volume writes it)", paths.volume_index, unwritten.strerror)


@dataclass
class ExtractedVolume:
    """A volume whose features are computed and whose last writes may still be in flight,
    its lock held until `finish` commits it or `abandon` records why it will not be."""

    config: ExtractionConfig
    source: VolumeSource
    loaded: LoadedModel
    crop: SourceCrop
    staged: StagedArrays
    writer: AsyncBlockWriter
    stats: FeatureStatistics
    commit_id: str
    timing: dict[str, float]
    started: float  # perf_counter at the start of the volume's extraction
    lock: ExitStack = field(default_factory=ExitStack)

    def finish(self) -> VolumeOutcome:
        """Wait for the writes, seal the metadata and commit; safe on any thread."""
        paths = self.config.paths
        with self.lock:
            with disk_full_as_one_line(paths), failure_recorded(paths, self.commit_id):
                try:
                    self.writer.flush()
                except BaseException:
                    self.writer.abandon()
                    raise
                metadata = self.commit()
            # committed: from here on nothing fails the volume, a problem is a warning
            write_complete_status(paths, timing=metadata.timing)
        return VolumeOutcome("complete", f"volume {self.config.volume_index} complete: {paths.metadata}", metadata)

    def abandon(self, error: BaseException) -> None:
        """The run stops before this volume is finished: its staged arrays go, the failure is recorded."""
        with self.lock:
            self.writer.abandon()
            record_failure(self.config.paths, error)

    def commit(self) -> VolumeMetadata:
        config, timing = self.config, self.timing
        timing["tensorstore_write_seconds"] = self.writer.wait_seconds
        storage = {name: bytes_on_disk(config.paths.staged_array(name)) for name in self.staged.stores}
        # after the load: the fingerprint records the weights actually loaded
        fingerprint_values = config.fingerprint_values(self.source)
        # checked against the schema before anything of an existing volume is touched
        metadata = volume_metadata(config, self.loaded, self.crop, self.staged, self.writer.checksums, storage, self.stats,
                                   self.commit_id, fingerprint_values, rounded(timing))
        timing["total_seconds"] = time.perf_counter() - self.started
        metadata = replace(metadata, timing=rounded(timing)).sealed()
        hold_signals()
        unfinished = commit_volume(config.paths, self.commit_id, metadata)
        if unfinished is not None:
            log.warning(unfinished)
        return metadata


def extract(
    config: ExtractionConfig, source: VolumeSource, model: ModelOnDemand, read_crop: Callable[[], SourceCrop]
) -> ExtractedVolume:
    """Stage the arrays, run the model over the crop and start every write."""
    paths = config.paths
    timing: dict[str, float] = {}
    loaded = model.get()
    timing["model_load_seconds"] = model.take_load_seconds()
    check_slice_size(config.geometry, loaded.patch_size)

    t = time.perf_counter()
    crop = read_crop()
    timing["source_read_seconds"] = time.perf_counter() - t  # the wait only, when read in the background

    started = time.perf_counter()
    commit_id = uuid.uuid4().hex
    grid_size = config.geometry.slice_size // loaded.patch_size
    ensure_free_space(config, crop, loaded.hidden_size, grid_size)
    paths.staging.mkdir(parents=True)
    context = ts_context(config.storage.num_threads)
    staged = stage_arrays(config, crop, loaded.hidden_size, commit_id, context, grid_size)
    writer = AsyncBlockWriter()
    stats = FeatureStatistics()
    try:
        write_label_arrays(crop, staged, writer)
        t = time.perf_counter()
        progress = Progress(config.geometry.output_image_dim * len(config.planes), f"volume {config.volume_index}")
        write_features(loaded, crop, config, staged, writer, stats, progress)
        progress.close()
        # the writes overlap the computation; only the time spent waiting on them is not extraction
        timing["feature_extraction_seconds"] = time.perf_counter() - t - writer.wait_seconds
    except BaseException:
        writer.abandon()
        raise
    return ExtractedVolume(config, source, loaded, crop, staged, writer, stats, commit_id, timing, started)


def rounded(timing: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 4) for k, v in timing.items()}
