"""What the audit looks at before reading any file: the expected volume indices, one
listing of OUT and one of OUT/logs grouped by volume, and the storage measure (one `du`
run in the background while the report reads the metadata)."""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from dinov3_cache.disk import bytes_on_disk
from dinov3_cache.errors import UsageError
from dinov3_cache.paths import ARRAY_NAMES, VOLUME_ENTRY_RE, VolumePaths, volume_entry_index


class AuditError(UsageError):
    """Bad input to the audit; one actionable line."""


@dataclass
class Expectation:
    indices: list[int]
    source: str  # where the expected set came from, in words


def expected_volumes(
    explicit: list[int] | None, submissions: list[dict], found: Iterable[int]
) -> Expectation:
    """The indices that should exist: given on the command line, else every recorded
    submission's, else 0 to the largest index seen on disk (gaps at the end unknown)."""
    if explicit is not None:
        return Expectation(sorted(set(explicit)), "given on the command line")
    submitted = sorted({int(i) for record in submissions for i in record.get("indices", [])})
    if submitted:
        return Expectation(submitted, f"from {len(submissions)} recorded submission(s)")
    seen = list(found)
    if not seen:
        return Expectation([], "nothing submitted or found")
    return Expectation(
        list(range(max(seen) + 1)),
        "inferred from the files (0 to the largest index; pass --num-volumes or --indices to count gaps at the end)",
    )


# ----------------------------------------------------------------------------- scanning the directory


@dataclass
class DirectoryScan:
    """Names found by one listing of OUT and one of OUT/logs, per volume index, keyed by
    role: 'metadata', 'staging', an array name, or 'status', 'log_out', 'log_err', 'lock'."""

    output_dir: Path
    entries: dict[int, dict[str, str]]
    log_entries: dict[int, dict[str, str]]
    names: dict[int, list[str]] = field(default_factory=dict)  # every name of a volume in OUT (debris too)
    log_names: dict[int, list[str]] = field(default_factory=dict)

    def listing(self, index: int) -> tuple[list[str], list[str]]:
        """One volume's names in OUT and OUT/logs, for layout.partial_debris."""
        return self.names.get(index, []), self.log_names.get(index, [])

    def has_unexpected_names(self, index: int) -> bool:
        """Names no complete volume has (staging, commit directories, temporary files)."""
        return "staging" in self.entries.get(index, {}) or len(self.names.get(index, ())) > len(self.entries.get(index, ())) or len(
            self.log_names.get(index, ())) > len(self.log_entries.get(index, ()))

    def complete(self) -> list[int]:
        return sorted(i for i, roles in self.entries.items() if "metadata" in roles)

    def known_indices(self) -> set[int]:
        return set(self.entries) | set(self.log_entries)


def entry_roles() -> dict[str, str]:
    """Suffix after the volume name -> role, derived from VolumePaths (the one place
    that spells file names)."""
    paths = VolumePaths(Path("."), 0)
    named = {"metadata": paths.metadata, "staging": paths.staging, "status": paths.status,
             "log_out": paths.log_out, "log_err": paths.log_err, "lock": paths.lock}
    named.update({a: paths.array(a) for a in ARRAY_NAMES})
    return {path.name[len(paths.name):]: role for role, path in named.items()}


def group_by_volume(names: Iterable[str], roles: dict[str, str]) -> dict[int, dict[str, str]]:
    grouped: dict[int, dict[str, str]] = {}
    match_volume = VOLUME_ENTRY_RE.match
    for name in names:
        match = match_volume(name)
        role = roles.get(name[match.end():]) if match else None
        if role is not None:
            grouped.setdefault(int(match.group(1)), {})[role] = name
    return grouped


def scan_directory(output_dir: Path) -> DirectoryScan:
    logs = VolumePaths(output_dir, 0).logs
    try:
        log_names = os.listdir(logs)
    except FileNotFoundError:
        log_names = []
    except PermissionError as e:
        raise AuditError(f"cannot list {logs} ({e.strerror}); run the audit as a user who can read the cache") from None
    try:
        names = os.listdir(output_dir)
    except OSError as e:
        raise AuditError(f"cannot list --output-dir {output_dir} ({e.strerror}); run the audit as a user who can read it") from None
    roles = entry_roles()
    return DirectoryScan(output_dir, group_by_volume(names, roles), group_by_volume(log_names, roles),
                         names_by_volume(names), names_by_volume(log_names))


def names_by_volume(names: Iterable[str]) -> dict[int, list[str]]:
    grouped: dict[int, list[str]] = {}
    for name in names:
        index = volume_entry_index(name)
        if index is not None:
            grouped.setdefault(index, []).append(name)
    return grouped


# ----------------------------------------------------------------------------- storage


class StorageMeasure:
    """Bytes on disk of every top-level entry of OUT. Measured by one `du -k -d 1` run in
    the background while the metadata is read (the cost of one du); if du is missing or
    fails, by walking the files with layout.bytes_on_disk."""

    def __init__(self, output_dir: Path):
        self.output_dir = output_dir
        self.method = "measured with du"
        self._out = tempfile.TemporaryFile()
        try:
            self._proc: subprocess.Popen | None = subprocess.Popen(
                ["du", "-k", "-d", "1", str(output_dir)], stdout=self._out, stderr=subprocess.DEVNULL
            )
        except OSError:
            self._proc = None

    def result(self, entry_names: Iterable[str]) -> dict[str, int]:
        sizes = self._du_sizes()
        if sizes is None:
            self.method = "measured by walking the files"
            sizes = {name: self._walk(self.output_dir / name) for name in entry_names}
        return sizes

    @staticmethod
    def _walk(path: Path) -> int:
        try:
            return bytes_on_disk(path)
        except NotADirectoryError:
            return 0  # a file (metadata): du -d 1 leaves files out as well

    def _du_sizes(self) -> dict[str, int] | None:
        if self._proc is None:
            return None
        self._proc.wait()
        self._out.seek(0)
        sizes = {}
        for line in self._out.read().decode(errors="replace").splitlines():
            kib, _, path = line.partition("\t")
            if kib.isdigit() and path:
                sizes[os.path.basename(path)] = int(kib) * 1024
        self._out.close()
        # du exits 1 when an entry vanished mid-walk (a job committing): its other lines stand
        return sizes or None

