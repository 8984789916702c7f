"""File names of a feature cache: where every file of a volume lives, and how a name says
which volume it belongs to. Names only: writing files is records.py, locking locks.py, and
committing a volume (what is committed, what is debris) commit_protocol.py.

Layout of an output directory::

    volume_000000_features.zarr   features (C, D, H, W) (dense layout)
    volume_000000_tokens.zarr     the planes' token grids (P, C, D, g, g) (tokens layout)
    volume_000000_gt.zarr         labels (D, H, W)
    volume_000000_mask.zarr       valid-label mask (D, H, W), with GT extension
    volume_000000_raw.zarr        raw crop at slice resolution (only with --save-raw)
    volume_000000_metadata.json   the commit marker, written last and atomically
    volume_000000.partial/        staging area of a run in progress (debris if killed)
    volume_000000.commit-ID/      arrays of commit ID until moved to the names above (commit_protocol.py)
    .NAME.PID.tmp                 an atomic JSON write of process PID in progress (records.py)
    logs/volume_000000.status.json  running / complete / failed, host, times, error
    logs/volume_000000.lock       held by the run that owns the index
    logs/volume_000000.out|.err   scheduler job output
    logs/scheduler/               the batch scheduler's own files per array element (kill notices)
    logs/submissions/             one record and one settings file per submission
    PREVIEW_DIR/volume_000000_preview.png   the audit's preview image (wherever --preview points)
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

VOLUME_NAME_RE = re.compile(r"^volume_(\d{6,})_metadata\.json$")
VOLUME_ENTRY_RE = re.compile(r"^volume_(\d{6,})(?=[._])")  # any file of a volume, in OUT or OUT/logs
TEMP_PID_RE = re.compile(r"^\..+\.(\d+)\.tmp$")  # temp_path's names
ARRAY_NAMES = ("features", "tokens", "gt", "mask", "raw")
COMMIT_DIR_INFIX = ".commit-"
LOGS_DIR = "logs"


def volume_name(volume_index: int) -> str:
    return f"volume_{volume_index:06d}"


@dataclass(frozen=True)
class VolumePaths:
    """Where every file of one volume lives."""

    output_dir: Path
    volume_index: int

    @property
    def name(self) -> str:
        return volume_name(self.volume_index)

    def array(self, array_name: str) -> Path:
        return self.output_dir / f"{self.name}_{array_name}.zarr"

    @property
    def metadata(self) -> Path:
        return self.output_dir / f"{self.name}_metadata.json"

    @property
    def staging(self) -> Path:
        return self.output_dir / f"{self.name}.partial"

    def staged_array(self, array_name: str) -> Path:
        return self.staging / f"{array_name}.zarr"

    def commit_dir(self, commit_id: str) -> Path:
        """Where a commit's arrays sit from the staging rename until they take the seed's names."""
        return self.output_dir / f"{self.name}{COMMIT_DIR_INFIX}{commit_id}"

    def committing_array(self, array_name: str, commit_id: str) -> Path:
        """An array of commit `commit_id` while it sits in its commit directory."""
        return self.commit_dir(commit_id) / f"{array_name}.zarr"

    def located_array(self, array_name: str, commit_id: str | None) -> Path:
        """Where the committed volume's array is: in its commit directory while the commit is
        being finished (or was killed before it finished), else under the seed's name."""
        if commit_id:
            moving = self.committing_array(array_name, commit_id)
            if moving.is_dir():
                return moving
        return self.array(array_name)

    @property
    def logs(self) -> Path:
        return self.output_dir / LOGS_DIR

    @property
    def status(self) -> Path:
        return self.logs / f"{self.name}.status.json"

    @property
    def lock(self) -> Path:
        return self.logs / f"{self.name}.lock"

    @property
    def log_out(self) -> Path:
        return self.logs / f"{self.name}.out"

    @property
    def log_err(self) -> Path:
        return self.logs / f"{self.name}.err"

    def existing_arrays(self) -> list[Path]:
        return [self.array(a) for a in ARRAY_NAMES if self.array(a).exists()]


def preview_path(preview_dir: Path | str, volume_index: int) -> Path:
    """The audit's preview image of one volume (check_preprocessing.py --preview DIR)."""
    return Path(preview_dir) / f"{volume_name(volume_index)}_preview.png"


def temp_path(path: Path, pid: int) -> Path:
    """The temporary name an atomic write (records.write_json_atomic) gives `path` in process `pid`."""
    return path.with_name(f".{path.name}.{pid}.tmp")


def temp_pid(path: Path) -> int | None:
    """The process a temporary file of temp_path belongs to; None for any other name."""
    match = TEMP_PID_RE.match(path.name)
    return int(match.group(1)) if match else None


def list_names(directory: Path) -> list[str]:
    try:
        return os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return []


def volume_names(names: list[str], volume_index: int) -> list[str]:
    """The names of one volume's files among a directory's (temporary files included)."""
    return [n for n in names if volume_entry_index(n) == volume_index]


def volume_entry_index(name: str) -> int | None:
    """The volume index a file of OUT or OUT/logs belongs to (its temporary files too)."""
    match = VOLUME_ENTRY_RE.match(name[1:] if name.startswith(".") else name)
    return int(match.group(1)) if match else None


def metadata_indices(names: list[str]) -> list[int]:
    """Indices of the metadata files among a directory's names, sorted."""
    return sorted(int(m.group(1)) for m in map(VOLUME_NAME_RE.match, names) if m)
