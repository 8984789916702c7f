"""Committing a volume: the output directory check, the skip-or-refuse check against an
existing volume, removal of an interrupted run's debris, and moving staged arrays into place.
The metadata file, written last by the caller, is the commit marker."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dinov3_cache.extraction.config import ExtractionConfig, PreprocessingError
from dinov3_cache.extraction.weights import weights_identity_resolved
from dinov3_cache.layout import VolumePaths, fsync_directory, partial_debris, remove_tree
from dinov3_cache.schema import MetadataError, VolumeMetadata, config_fingerprint, load_volume_metadata
from dinov3_cache.sources.base import VolumeSource

log = logging.getLogger("dinov3_preprocessing")


@dataclass
class VolumeOutcome:
    state: str  # complete | skipped
    message: str
    metadata: VolumeMetadata | None = None


def ensure_writable(output_dir: Path) -> None:
    try:
        (output_dir / "logs").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        what = f"{output_dir / 'logs'} in output directory" if output_dir.is_dir() else "output directory"
        raise PreprocessingError(f"cannot create {what} {output_dir} ({e.strerror}); choose a writable --output-dir") from None
    if not os.access(output_dir, os.W_OK | os.X_OK) or not os.access(output_dir / "logs", os.W_OK | os.X_OK):
        raise PreprocessingError(f"output directory {output_dir} is not writable; choose a writable --output-dir")


def existing_volume_check(
    config: ExtractionConfig, source: VolumeSource, load_model: Callable[[], object]
) -> VolumeOutcome | None:
    """Skip a complete volume made with the same configuration; refuse a different one
    unless --overwrite, which replaces it once the new one is ready. The fingerprint names
    the weights: when their identity cannot be resolved without loading them (a hub id,
    offline and not cached), `load_model` is called first and the loaded commit compared."""
    paths = config.paths
    if not paths.metadata.exists() or config.overwrite:
        return None
    try:
        metadata = load_volume_metadata(paths.metadata)
    except MetadataError as e:
        raise PreprocessingError(
            f"volume {config.volume_index}: {e}; inspect it, or pass --overwrite to recompute the volume"
        ) from None
    values = config.fingerprint_values(source)
    if not weights_identity_resolved(values["weights"]):
        load_model()
        values = config.fingerprint_values(source)
    existing = metadata.configuration.fingerprint
    wanted = config_fingerprint(values)
    if existing != wanted:
        raise PreprocessingError(
            f"volume {config.volume_index} already exists with a different configuration (fingerprint {existing}, "
            f"this run {wanted}); pass --overwrite to replace it, or use another --output-dir"
        )
    return VolumeOutcome(
        "skipped", f"volume {config.volume_index} is already complete; skipping (use --overwrite to recompute)", metadata
    )


def remove_debris(paths: VolumePaths) -> None:
    """Remove what an interrupted run left (its staging directory); called under the lock."""
    for debris in partial_debris(paths):
        log.info("removing debris of an interrupted run: %s", debris)
        remove_tree(debris)


def commit_volume(paths: VolumePaths, array_names: list[str]) -> None:
    """Move staged arrays into place. An existing volume (overwrite) stops being visible
    first: its metadata goes, then its arrays; the new metadata is written by the caller."""
    if paths.metadata.exists():
        paths.metadata.unlink()
        fsync_directory(paths.output_dir)
    old = paths.staging / "replaced"
    old.mkdir()
    for array in paths.existing_arrays():
        os.replace(array, old / array.name)
    for name in array_names:
        os.replace(paths.staged_array(name), paths.array(name))
    fsync_directory(paths.output_dir)
