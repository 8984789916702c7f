"""Debris of dead runs: staging areas, stale commit directories, arrays no committed
metadata names, temporary files of atomic writes. The audit lists it from its one listing
of OUT; --remove-debris removes it, volume by volume under the volume's lock, so a live
run's files (its lock is held) are never touched."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dinov3_cache.audit.scan import DirectoryScan, scan_directory
from dinov3_cache.layout import (
    VolumeLock,
    VolumeLocked,
    VolumePaths,
    bytes_on_disk,
    fsync_directory,
    lock_is_held,
    partial_debris,
    remove_tree,
)


def removal_command(output_dir: Path) -> str:
    return f"python check_preprocessing.py --output-dir {output_dir} --remove-debris"


def dead_debris(paths: VolumePaths, scan: DirectoryScan) -> list[Path]:
    """The volume's debris from the scan's names; none while a live run holds its lock."""
    debris = partial_debris(paths, scan.listing(paths.volume_index))
    return debris if debris and not lock_is_held(paths) else []


@dataclass
class Removed:
    path: str
    bytes: int


def remove_debris(output_dir: Path) -> tuple[list[Removed], list[int]]:
    """Remove every dead run's debris; returns what was removed and the volumes skipped
    because a live run holds them."""
    scan = scan_directory(output_dir)
    removed: list[Removed] = []
    live: list[int] = []
    for index in sorted(set(scan.names) | set(scan.log_names)):
        paths = VolumePaths(output_dir, index)
        if not partial_debris(paths, scan.listing(index)):
            continue
        try:
            with VolumeLock(paths):  # a run starting now waits for (or is refused by) this lock
                for path in partial_debris(paths):  # listed again, under the lock
                    size = bytes_on_disk(path)
                    remove_tree(path)
                    removed.append(Removed(str(path), size))
        except VolumeLocked:
            live.append(index)
    if removed:
        fsync_directory(output_dir)
    return removed, live
