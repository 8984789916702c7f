"""Debris of dead runs: staging areas, stale commit directories, arrays no committed
metadata names, temporary files of atomic writes. The audit lists it from its one listing
of OUT; --remove-debris removes it, volume by volume under the volume's lock, so a live
run's files (its lock is held) are never touched. It also repairs the status record of a
committed volume whose run was killed before its last status write."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dinov3_cache.audit.scan import AuditError, DirectoryScan, scan_directory
from dinov3_cache.commit_protocol import partial_debris, remove_dead_debris, repair_status
from dinov3_cache.locks import VolumeLock, VolumeLocked
from dinov3_cache.paths import VolumePaths
from dinov3_cache.records import fsync_directory, read_status


def removal_command(output_dir: Path) -> str:
    return f"python check_preprocessing.py --output-dir {output_dir} --remove-debris"


@dataclass
class Removed:
    path: str
    bytes: int


@dataclass
class Repaired:
    volume_index: int
    said: str  # the state the status record said


def remove_debris(output_dir: Path) -> tuple[list[Removed], list[int], list[Repaired]]:
    """Remove every dead run's debris and repair committed volumes' status records; returns
    what was removed, the volumes skipped because a live run holds them, and the records
    repaired. A cache that cannot be written (read-only) is one AuditError."""
    scan = scan_directory(output_dir)
    removed: list[Removed] = []
    live: list[int] = []
    try:
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
        repaired = repair_status_records(output_dir, scan, live)
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        raise AuditError(f"cannot remove debris in {output_dir} ({where}{e.strerror}); run --remove-debris as a user "
                         f"who can write the cache, on a writable mount{removal_summary(removed)}") from None
    return removed, live, repaired


def removal_summary(removed: list[Removed]) -> str:
    return f" ({len(removed)} entries were removed before)" if removed else ""


def repair_status_records(output_dir: Path, scan: DirectoryScan, live: list[int]) -> list[Repaired]:
    """Committed volumes whose status record says other than complete, each under its lock."""
    repaired = []
    for index in scan.complete():
        if index in live or "status" not in scan.log_entries.get(index, {}):
            continue
        paths = VolumePaths(output_dir, index)
        if (read_status(paths) or {}).get("state", "complete") == "complete":
            continue  # read first: most records are right, and taking a lock writes its file
        try:
            with VolumeLock(paths):
                said = repair_status(paths)
        except VolumeLocked:
            continue  # a live run: it writes its own record
        if said is not None:
            repaired.append(Repaired(index, said))
    return repaired
