"""The per-volume lock: one run owns an index at a time, and the audit never removes the
files of a run whose lock is held. An flock, so the kernel releases it when its holder dies."""

from __future__ import annotations

import errno
import fcntl
import os
import socket

from dinov3_cache.errors import EXIT_LOCKED, CacheToolError
from dinov3_cache.paths import VolumePaths


class VolumeLocked(CacheToolError):
    """Another live process holds this volume's lock."""

    exit_status = EXIT_LOCKED


class VolumeLock:
    """An exclusive flock on logs/volume_XXXXXX.lock; its file names the holder."""

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
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        except OSError:  # a full disk: not held, and no descriptor left open
            os.close(fd)
            raise
        self.fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def lock_is_held(paths: VolumePaths) -> bool:
    """True while a live process holds the volume's lock (without taking it)."""
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
