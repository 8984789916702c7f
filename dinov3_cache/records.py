"""JSON records of a cache: atomic writes (readers see the old file or the new one, never
part of one), the canonical spelling that digests hash, and each volume's status record."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from dinov3_cache.paths import VolumePaths, temp_path


def canonical_json(value: Any) -> str:
    """One spelling of a JSON value (sorted keys, no spaces): what digests and fingerprints hash."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def write_json_atomic(path: Path, value: Any) -> None:
    """Write to a temporary name, fsync, rename: readers see the old file or the new one. A
    write that fails (a full disk) leaves no temporary file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path, os.getpid())
    try:
        with open(tmp, "w") as f:
            json.dump(value, f, indent=2, sort_keys=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_directory(path.parent)


def fsync_directory(directory: Path) -> None:
    """Make a rename or removal in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_json(path: Path) -> Any:
    with open(path) as f:
        return json.load(f)


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


# ----------------------------------------------------------------------------- status records


def write_status(paths: VolumePaths, state: str, **fields: Any) -> dict:
    """Record running / complete / failed / skipped for one volume, keeping earlier fields
    this process wrote."""
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


def write_status_or_remove(paths: VolumePaths, state: str, **fields: Any) -> OSError | None:
    """write_status where the record may not be writable (a full disk): then the record is
    removed, so that it never goes on saying `running` for a run that ended. Returns the
    error that prevented the write, None when it was written."""
    try:
        write_status(paths, state, **fields)
    except OSError as e:
        with contextlib.suppress(OSError):
            paths.status.unlink(missing_ok=True)
        return e
    return None


def read_status(paths: VolumePaths) -> dict | None:
    """The volume's status record; None when there is none or it is unreadable."""
    try:
        return read_json(paths.status)
    except (FileNotFoundError, json.JSONDecodeError):
        return None
