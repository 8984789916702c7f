"""Debris of dead runs: staging areas, stale commit directories, arrays no committed
metadata names, temporary files of atomic writes. The audit lists it from its one listing
of OUT; --remove-debris removes it, volume by volume under the volume's lock, so a live
run's files (its lock is held) are never touched."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dinov3_cache.audit.scan import scan_directory
from dinov3_cache.commit_protocol import partial_debris, remove_dead_debris
from dinov3_cache.paths import VolumePaths
from dinov3_cache.records import fsync_directory


def removal_command(output_dir: Path) -> str:
    return f"python check_preprocessing.py --output-dir {output_dir} --remove-debris"


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
        gone = remove_dead_debris(paths)
        if gone is None:
            live.append(index)
        else:
            removed += [Removed(str(path), size) for path, size in gone]
    if removed:
        fsync_directory(output_dir)
    return removed, live
