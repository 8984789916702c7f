"""Extraction's side of committing a volume: the output directory check, the free-space
check, a full disk as one line, and the skip-or-refuse check against an existing volume.
The commit itself and what counts as debris: dinov3_cache/commit_protocol.py; signals from
the commit on: signals.py."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from dinov3_cache.extraction.config import ExtractionConfig, PreprocessingError
from dinov3_cache.extraction.weights import weights_identity_resolved
from dinov3_cache.paths import LOGS_DIR, VolumePaths
from dinov3_cache.schema import MetadataError, VolumeMetadata, config_fingerprint, load_volume_metadata
from dinov3_cache.sources.base import SourceCrop, VolumeSource
from dinov3_cache.zarr_arrays import StorageError, dtype_itemsize


@dataclass
class VolumeOutcome:
    state: str  # complete | skipped
    message: str
    metadata: VolumeMetadata | None = None


def ensure_writable(output_dir: Path) -> None:
    logs = output_dir / LOGS_DIR
    try:
        logs.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        what = f"{logs} in output directory" if output_dir.is_dir() else "output directory"
        raise PreprocessingError(f"cannot create {what} {output_dir} ({e.strerror}); choose a writable --output-dir") from None
    if not os.access(output_dir, os.W_OK | os.X_OK) or not os.access(logs, os.W_OK | os.X_OK):
        raise PreprocessingError(f"output directory {output_dir} is not writable; choose a writable --output-dir")


# ----------------------------------------------------------------------------- free space

SPACE_MARGIN = 1.05  # on top of the uncompressed size: zarr metadata, file system blocks
SPACE_MARGIN_BYTES = 16 * 2**20


class OutOfSpace(StorageError):
    """The output file system cannot hold the volume; the staging area was removed."""


def volume_bytes_needed(config: ExtractionConfig, crop: SourceCrop, hidden_size: int, grid_size: int) -> int:
    """The volume's uncompressed size (an upper bound on what compression leaves): the
    features' array in its storage form and the stored dtype, the labels and mask, and the raw
    crop with --save-raw."""
    features = config.storage_form.bytes_needed(
        hidden_size, config.geometry.output_image_dim, config.planes, grid_size, dtype_itemsize(config.features_dtype))
    arrays = [crop.gt, crop.mask] + ([crop.raw] if config.save_raw else [])
    return features + sum(a.nbytes for a in arrays if a is not None)


def check_free_space(free_bytes: int, needed_bytes: int, output_dir: Path, volume_index: int) -> None:
    """Refuse to start a volume the file system cannot hold (with the margin)."""
    wanted = int(needed_bytes * SPACE_MARGIN) + SPACE_MARGIN_BYTES
    if free_bytes < wanted:
        raise OutOfSpace(
            f"volume {volume_index} needs up to {wanted / 2**20:.1f} MiB but {output_dir} has {free_bytes / 2**20:.1f} MiB free; "
            "free space or choose another --output-dir (--no-space-check skips this check)"
        )


def ensure_free_space(config: ExtractionConfig, crop: SourceCrop, hidden_size: int, grid_size: int) -> None:
    if not config.space_check:
        return
    stat = os.statvfs(config.paths.output_dir)
    check_free_space(stat.f_bavail * stat.f_frsize, volume_bytes_needed(config, crop, hidden_size, grid_size),
                     config.paths.output_dir, config.volume_index)


def names_output_file(error: BaseException, paths: VolumePaths) -> bool:
    """Whether the error is about a file under the output directory (or names no file)."""
    filename = getattr(error, "filename", None)
    if not filename:
        return True
    return Path(os.path.abspath(filename)).is_relative_to(os.path.abspath(paths.output_dir))


def is_disk_full(error: BaseException) -> bool:
    """ENOSPC or EDQUOT, or TensorStore's RESOURCE_EXHAUSTED / 'No space left'."""
    text = str(error)
    return (isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)) or (
        isinstance(error, (ValueError, RuntimeError)) and ("RESOURCE_EXHAUSTED" in text or "No space left" in text)
    )


def as_storage_error(error: BaseException, paths: VolumePaths) -> BaseException:
    """A full output file system while writing as one line; any other error unchanged (a full
    disk elsewhere, say the model cache's, names its own file)."""
    if not is_disk_full(error) or not names_output_file(error, paths):
        return error
    return OutOfSpace(
        f"volume {paths.volume_index}: the file system of {paths.output_dir} is full (or over quota) while writing; "
        "nothing partial was left: free space or choose another --output-dir"
    )


@contextmanager
def disk_full_as_one_line(paths: VolumePaths) -> Iterator[None]:
    """A full disk anywhere inside (the lock, a status record, the metadata, the arrays) is
    the one-line OutOfSpace, never a traceback."""
    try:
        yield
    except (OSError, ValueError, RuntimeError) as caught:
        converted = as_storage_error(caught, paths)
        if converted is caught:
            raise
        raise converted from None


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
