"""How a volume commits, and what its interrupted runs leave behind: the one definition of
staged, committed and debris, used by extraction (commit, tidy) and the audit (list and
remove debris).

A commit never leaves an index without a complete volume (old or new), whatever syscall a
kill interrupts:

1. the staged arrays are written under volume_X.partial/ (debris if killed: the old volume stands);
2. volume_X.partial/ is renamed to volume_X.commit-ID/ (still debris: the old metadata names
   another commit id);
3. the new metadata (with commit id ID) is renamed into place: the single commit point.
   Readers locate each array in volume_X.commit-ID/ while it is there (VolumePaths.located_array);
4. each array of the replaced volume is removed and the new one renamed to the seed's name
   (volume_X_features.zarr ...); then the empty commit directory is removed.

Step 4 is idempotent and any later run of the index finishes it under the lock
(finish_commit), before it removes the debris of dead runs (tidy_volume). A volume exists
for readers exactly when its metadata file exists.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from dinov3_cache.disk import bytes_on_disk
from dinov3_cache.locks import VolumeLock, VolumeLocked, lock_is_held
from dinov3_cache.paths import (
    ARRAY_NAMES,
    COMMIT_DIR_INFIX,
    VolumePaths,
    list_names,
    metadata_indices,
    temp_pid,
    volume_names,
)
from dinov3_cache.records import fsync_directory, now_iso, read_status, write_json_atomic, write_status_or_remove
from dinov3_cache.schema import MetadataError, VolumeMetadata, load_volume_metadata

log = logging.getLogger("dinov3_preprocessing")

Listing = tuple[list[str], list[str]]  # one volume's names in OUT and in OUT/logs


# ----------------------------------------------------------------------------- committed volumes


def is_volume_complete(output_dir: Path | str, volume_index: int) -> bool:
    """The one completeness test: the metadata file (the commit marker) exists."""
    return VolumePaths(Path(output_dir), volume_index).metadata.is_file()


def committed_volume_indices(output_dir: Path | str) -> list[int]:
    """Indices of every committed volume, sorted. One directory listing, no stat per file."""
    try:
        names = os.listdir(output_dir)
    except FileNotFoundError:
        return []
    return metadata_indices(names)


@dataclass(frozen=True)
class Committed:
    """What the committed metadata says the volume is: its commit id and its arrays."""

    commit_id: str | None
    arrays: tuple[str, ...]


UNREADABLE = "unreadable"  # committed_arrays of a volume whose metadata cannot be read


def committed_arrays(paths: VolumePaths) -> Committed | str | None:
    """The committed volume's commit id and array names, read through its schema; None when
    none is committed; UNREADABLE when its metadata cannot be read (then no array counts as
    debris: a person decides)."""
    try:
        metadata = load_volume_metadata(paths.metadata)
    except MetadataError:
        return UNREADABLE if paths.metadata.exists() else None
    if metadata.dtypes is None:  # version 1 files do not name their arrays
        return UNREADABLE
    return Committed(metadata.commit_id, tuple(metadata.dtypes))


def repair_status(paths: VolumePaths) -> str | None:
    """Under the lock, for a committed volume: a run killed between its commit point and its
    last status write left a record saying `running` (a dead process) or `failed`, or none
    (a full disk); the volume is complete, and so is its record now. Returns the state it
    said ('missing' for none), None when it was right or could not be rewritten (a full
    disk: then no record is left, never a wrong one)."""
    status = read_status(paths)
    if status is not None and status.get("state") == "complete":
        return None
    if write_status_or_remove(paths, "complete", repaired=now_iso()) is not None:
        return None
    return str(status.get("state")) if status is not None else "missing"


# ----------------------------------------------------------------------------- commit


def commit_volume(paths: VolumePaths, commit_id: str, metadata: VolumeMetadata) -> str | None:
    """Make the staged arrays and `metadata` the volume (steps 2-4 above). Raises when the
    volume was not committed, having removed this commit's arrays (a full disk leaves no
    debris). Once committed it raises only a signal that came meanwhile (re-raised after step 4;
    the volume stays complete): a failure of step 4 (an old array that cannot be removed) is
    returned as a warning; readers use the commit directory, a later run finishes it."""
    os.rename(paths.staging, paths.commit_dir(commit_id))
    stopped: BaseException | None = None  # a signal that came once the volume was committed
    try:
        fsync_directory(paths.output_dir)
        write_json_atomic(paths.metadata, metadata.to_dict())  # the commit point
    except BaseException as e:
        if not names_commit(paths, commit_id):
            remove_tree(paths.commit_dir(commit_id))
            raise
        if not isinstance(e, Exception):
            stopped = e  # re-raised once the commit is finished
        # else committed: only a sync after the rename failed
    try:
        tidy_volume(paths)  # step 4, and the replaced volume's arrays the new one lacks
    except OSError as e:
        return (f"volume {paths.volume_index} is committed, but finishing its commit failed ({e.strerror}: {e.filename}); it is read "
                f"from {paths.commit_dir(commit_id).name} until the next run of the volume finishes it")
    if stopped is not None:
        raise stopped
    return None


def names_commit(paths: VolumePaths, commit_id: str) -> bool:
    """Whether the committed metadata is that of commit `commit_id`."""
    committed = committed_arrays(paths)
    return isinstance(committed, Committed) and committed.commit_id == commit_id


def finish_commit(paths: VolumePaths, committed: Committed) -> None:
    """Step 4: give the committed arrays the seed's names. Each array is readable at every
    instant: in the commit directory until its rename, under its own name after it."""
    if not committed.commit_id:
        return
    directory = paths.commit_dir(committed.commit_id)
    if not directory.is_dir():
        return
    for name in ARRAY_NAMES:
        moving = paths.committing_array(name, committed.commit_id)
        if name in committed.arrays and moving.is_dir():
            remove_tree(paths.array(name))  # the replaced volume's array (or a partly removed one)
            os.rename(moving, paths.array(name))
    fsync_directory(paths.output_dir)
    remove_tree(directory)
    fsync_directory(paths.output_dir)


def tidy_volume(paths: VolumePaths) -> list[Path]:
    """Under the lock: finish a killed run's commit, then remove every dead run's debris of
    this index (the lock guarantees no live run owns any). Returns what was removed."""
    committed = committed_arrays(paths)
    if isinstance(committed, Committed):
        finish_commit(paths, committed)
    removed = partial_debris(paths)
    for debris in removed:
        log.info("removing debris of an interrupted run: %s", debris)
        remove_tree(debris)
    if removed:
        fsync_directory(paths.output_dir)
    return removed


# ----------------------------------------------------------------------------- debris


def partial_debris(paths: VolumePaths, listing: Listing | None = None) -> list[Path]:
    """What killed runs left, judged from the files alone (the committed metadata's commit id
    and arrays when it is readable); whether a live run still owns them, the lock says
    (dead_debris). Never lists what a reader of the committed volume uses. `listing`: this
    volume's names in OUT and in OUT/logs (paths.volume_names), when the caller has listed them."""
    out_names, log_names = listing if listing is not None else (
        volume_names(list_names(paths.output_dir), paths.volume_index),
        volume_names(list_names(paths.logs), paths.volume_index),
    )
    present = set(out_names)
    committed = committed_arrays(paths) if paths.metadata.name in present else None
    debris = [paths.staging] if paths.staging.name in present else []
    if committed != UNREADABLE:
        debris += stale_commits_and_arrays(paths, present, committed)
    temps = [paths.output_dir / n for n in out_names] + [paths.logs / n for n in log_names]
    debris += [t for t in temps if temp_pid(t) not in (None, os.getpid())]
    return debris


def stale_commits_and_arrays(paths: VolumePaths, present: set[str], committed: Committed | None) -> list[Path]:
    """Commit directories of other commits than the committed one, and arrays under the seed's
    names that the committed volume does not use (not among its arrays, or about to be
    replaced by the one in its commit directory)."""
    commit_id, arrays = (committed.commit_id, committed.arrays) if committed else (None, ())
    live_commit = paths.commit_dir(commit_id).name if commit_id and paths.commit_dir(commit_id).name in present else None
    debris = [paths.output_dir / n for n in sorted(present) if n.startswith(paths.name + COMMIT_DIR_INFIX) and n != live_commit]
    for name in ARRAY_NAMES:
        if paths.array(name).name not in present:
            continue
        replaced = live_commit is not None and paths.committing_array(name, commit_id).is_dir()
        if name not in arrays or replaced:
            debris.append(paths.array(name))
    return debris


def dead_debris(paths: VolumePaths, listing: Listing | None = None) -> list[Path]:
    """The volume's debris; none while a live run holds its lock (its files are not debris yet)."""
    debris = partial_debris(paths, listing)
    return debris if debris and not lock_is_held(paths) else []


def remove_dead_debris(paths: VolumePaths) -> list[tuple[Path, int]] | None:
    """Remove the volume's debris under its lock (a run starting now waits for, or is refused
    by, the lock); returns each removed path and its bytes, or None when a live run holds it."""
    removed = []
    try:
        with VolumeLock(paths):
            for path in partial_debris(paths):  # listed again, under the lock
                size = bytes_on_disk(path)
                remove_tree(path)
                removed.append((path, size))
    except VolumeLocked:
        return None
    return removed


# ----------------------------------------------------------------------------- removal

REMOVE_TRIES = 5


def remove_tree(path: Path) -> None:
    """Remove a file or a directory tree. A failed multi-chunk write can leave TensorStore
    settling its other chunks for a moment, their lock files coming and going: files that
    vanish are fine, and a directory that gained one is removed again."""
    if path.is_dir() and not path.is_symlink():
        for attempt in range(REMOVE_TRIES):
            shutil.rmtree(path, onerror=ignore_settling_files)
            if not path.exists():
                return
            time.sleep(0.05 * (attempt + 1))
        shutil.rmtree(path)  # still there: the error says why
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


def remove_abandoned_tree(path: Path, quiet_seconds: float = 0.5, limit_seconds: float = 30.0) -> None:
    """Remove the staged arrays of a failed write. TensorStore reports a multi-chunk write's
    first failure while its other chunk writes still run, and a late one recreates its
    directories: the tree is removed again until nothing has reappeared for `quiet_seconds`."""
    remove_tree(path)
    deadline = time.monotonic() + limit_seconds
    quiet_since = time.monotonic()
    while time.monotonic() - quiet_since < quiet_seconds and time.monotonic() < deadline:
        time.sleep(0.05)
        if path.exists():
            remove_tree(path)
            quiet_since = time.monotonic()


def ignore_settling_files(function, name: str, exc_info) -> None:
    error = exc_info[1]
    if isinstance(error, FileNotFoundError) or (isinstance(error, OSError) and error.errno == errno.ENOTEMPTY):
        return
    raise error
