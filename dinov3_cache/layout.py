"""The on-disk layout of a feature cache: one definition of every name and rule.

Every script (extraction, submission, audit, loading) goes through this module to
find a volume's files, to decide whether a volume is complete, and to read or
write metadata and status records. Nothing else spells a file name.

Layout of an output directory::

    volume_000000_features.zarr   features (C, D, H, W) (dense layout)
    volume_000000_tokens.zarr     the planes' token grids (P, C, D, g, g) (tokens layout)
    volume_000000_gt.zarr         labels (D, H, W)
    volume_000000_mask.zarr       valid-label mask (D, H, W), with GT extension
    volume_000000_raw.zarr        raw crop at slice resolution (only with --save-raw)
    volume_000000_metadata.json   the commit marker, written last and atomically
    volume_000000.partial/        staging area of a run in progress (debris if killed)
    volume_000000.commit-ID/      arrays of commit ID until moved to the names above (see commit.py)
    logs/volume_000000.status.json  running / complete / failed, host, times, error
    logs/volume_000000.lock       held by the run that owns the index
    logs/volume_000000.out|.err   scheduler job output
    logs/scheduler/               the batch scheduler's own files per array element (kill notices)
    logs/submissions/             one record and one settings file per submission
    PREVIEW_DIR/volume_000000_preview.png   the audit\'s preview image (wherever --preview points)

A volume exists for readers exactly when its metadata file exists.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dinov3_cache.errors import EXIT_LOCKED, CacheToolError

VOLUME_NAME_RE = re.compile(r"^volume_(\d{6,})_metadata\.json$")
VOLUME_ENTRY_RE = re.compile(r"^volume_(\d{6,})(?=[._])")  # any file of a volume, in OUT or OUT/logs
ARRAY_NAMES = ("features", "tokens", "gt", "mask", "raw")


def feature_array_name(layout: str | None) -> str:
    """The array that holds a volume's features: `tokens` in the tokens layout, else `features`."""
    return "tokens" if layout == "tokens" else "features"

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

    def located_array(self, array_name: str, commit_id: str | None) -> Path:
        """Where the committed volume's array is: in its commit directory while the commit is
        being finished (or was killed before it finished), else under the seed's name."""
        if commit_id:
            moving = self.commit_dir(commit_id) / f"{array_name}.zarr"
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


def is_volume_complete(output_dir: Path | str, volume_index: int) -> bool:
    """The one completeness test: the metadata file (the commit marker) exists."""
    return VolumePaths(Path(output_dir), volume_index).metadata.is_file()


def committed_volume_indices(output_dir: Path | str) -> list[int]:
    """Indices of every committed volume, sorted. One directory listing, no stat per file."""
    try:
        names = os.listdir(output_dir)
    except FileNotFoundError:
        return []
    return sorted(int(m.group(1)) for m in map(VOLUME_NAME_RE.match, names) if m)


# ----------------------------------------------------------------------------- json


def canonical_json(value: Any) -> str:
    """One spelling of a JSON value (sorted keys, no spaces): what digests and fingerprints hash."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def write_json_atomic(path: Path, value: Any) -> None:
    """Write to a temporary name, fsync, rename: readers see the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path, os.getpid())
    with open(tmp, "w") as f:
        json.dump(value, f, indent=2, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_directory(path.parent)


def temp_path(path: Path, pid: int) -> Path:
    """The temporary name write_json_atomic gives `path` in process `pid`."""
    return path.with_name(f".{path.name}.{pid}.tmp")


TEMP_PID_RE = re.compile(r"^\..+\.(\d+)\.tmp$")


def fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_json(path: Path) -> Any:
    with open(path) as f:
        return json.load(f)


# ----------------------------------------------------------------------------- status records


def write_status(paths: VolumePaths, state: str, **fields: Any) -> dict:
    """Record running / complete / failed / skipped for one volume, keeping earlier fields."""
    from dinov3_cache.cluster.schedulers import current_job_id  # here: cluster/ imports this module

    previous = read_status(paths) or {}
    record = {
        **(previous if previous.get("pid") == os.getpid() else {}),
        "volume_index": paths.volume_index,
        "state": state,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "job_id": current_job_id(),
        "updated": now_iso(),
        **fields,
    }
    write_json_atomic(paths.status, record)
    return record


def read_status(paths: VolumePaths) -> dict | None:
    try:
        return read_json(paths.status)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


# ----------------------------------------------------------------------------- lock


class VolumeLocked(CacheToolError):
    exit_status = EXIT_LOCKED

    """Another live process holds this volume's lock."""


class VolumeLock:
    """An exclusive flock on logs/volume_XXXXXX.lock; released by the kernel if the holder dies."""

    def __init__(self, paths: VolumePaths):
        self.paths = paths
        self.fd: int | None = None

    def __enter__(self) -> VolumeLock:
        self.paths.logs.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.paths.lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise VolumeLocked(holder or "unknown holder") from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


# ----------------------------------------------------------------------------- debris


def partial_debris(paths: VolumePaths, listing: tuple[list[str], list[str]] | None = None) -> list[Path]:
    """What killed runs left, judged from the files alone (the committed metadata's commit id
    and arrays when it is readable); whether a live run still owns them, the lock says
    (lock_is_held). Never lists what a reader of the committed volume uses. `listing`: this
    volume's names in OUT and in OUT/logs (volume_names), when the caller has listed them."""
    out_names, log_names = listing if listing is not None else (
        volume_names(list_names(paths.output_dir), paths.volume_index),
        volume_names(list_names(paths.logs), paths.volume_index),
    )
    present = set(out_names)
    committed = committed_arrays(paths) if paths.metadata.name in present else None
    commit_id, arrays = committed if committed else (None, ())
    live_commit = paths.commit_dir(commit_id).name if commit_id and paths.commit_dir(commit_id).name in present else None
    debris = [paths.staging] if paths.staging.name in present else []
    if committed is not False:
        debris += [paths.output_dir / n for n in sorted(present)
                   if n.startswith(paths.name + COMMIT_DIR_INFIX) and n != live_commit]
        debris += [paths.array(name) for name in ARRAY_NAMES if paths.array(name).name in present
                   and (name not in arrays or (live_commit and (paths.commit_dir(commit_id) / f"{name}.zarr").is_dir()))]
    temps = [paths.output_dir / n for n in out_names] + [paths.logs / n for n in log_names]
    debris += [t for t in temps if TEMP_PID_RE.match(t.name) and temp_pid(t) != os.getpid()]
    return debris


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


def committed_arrays(paths: VolumePaths) -> tuple[str | None, tuple[str, ...]] | None | bool:
    """(commit id, array names) of the committed volume; None when none is committed;
    False when its metadata is unreadable (then no array counts as debris)."""
    try:
        document = read_json(paths.metadata)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return False
    if not isinstance(document, dict) or not isinstance(document.get("dtypes"), dict):
        return False
    return (document.get("integrity") or {}).get("commit_id"), tuple(document["dtypes"])


def temp_pid(path: Path) -> int | None:
    match = TEMP_PID_RE.match(path.name)
    return int(match.group(1)) if match else None


def lock_is_held(paths: VolumePaths) -> bool:
    """True while a live process holds the volume's lock (its debris is not debris yet)."""
    try:
        fd = os.open(paths.lock, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as e:
        return e.errno in (errno.EAGAIN, errno.EACCES)
    finally:
        os.close(fd)
    return False


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


def ignore_settling_files(function, name: str, exc_info) -> None:
    error = exc_info[1]
    if isinstance(error, FileNotFoundError) or (isinstance(error, OSError) and error.errno == errno.ENOTEMPTY):
        return
    raise error


def iter_files(root: Path) -> Iterator[os.DirEntry]:
    """Every regular file below root, via scandir (no extra stat on most file systems)."""
    stack = [root]
    while stack:
        try:
            entries = os.scandir(stack.pop())
        except FileNotFoundError:
            continue
        with entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                elif entry.is_file(follow_symlinks=False):
                    yield entry


def bytes_on_disk(root: Path) -> int:
    """Bytes allocated on disk below root, or by root itself when it is a file (like du),
    which is what storage planning needs. Files that vanish while running jobs commit or
    clean up are skipped."""
    try:
        if not root.is_dir() or root.is_symlink():
            return root.lstat().st_blocks * 512
    except FileNotFoundError:
        return 0
    total = 0
    for entry in iter_files(root):
        try:
            total += entry.stat(follow_symlinks=False).st_blocks * 512
        except FileNotFoundError:
            pass
    return total
