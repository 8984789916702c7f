"""Page-cache control for honest read benchmarks: evict files, measure residency and disk reads.

Cold means "not in the page cache": every file is fsync'ed (dirty pages cannot be dropped)
and then dropped with posix_fadvise(POSIX_FADV_DONTNEED); `residency` checks with mincore(2)
how much of the files is still cached, so a benchmark can say whether eviction worked.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from dinov3_cache.disk import iter_files
from dinov3_cache.loader.mapped_files import MAPPED_FILES

PAGE = mmap.PAGESIZE
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte))


def volume_files(volumes: Iterable) -> list[Path]:
    """Every file of the given cache volumes (CachedVolume): array chunks, array metadata, metadata file."""
    files: list[Path] = []
    for volume in volumes:
        for array in volume.metadata.paths:
            files += [Path(e.path) for e in iter_files(volume.array_path(array))]
        files.append(volume.paths.metadata)
    return files


def evict_from_page_cache(files: Iterable[Path]) -> None:
    """Drop the files' pages from the page cache. Pages mapped by a process stay: this process's
    kept chunk mappings (mapped_files.py) are dropped first, as a new process would have none."""
    MAPPED_FILES.clear()
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident_bytes(path: Path) -> tuple[int, int]:
    """(bytes of the file in the page cache, file size), by mincore(2) on a private mapping."""
    size = os.path.getsize(path)
    if size == 0:
        return 0, 0
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)  # writable view for ctypes, never written
    address = None  # bound before anything can interrupt: the cleanup below runs whatever happens
    try:
        pages = (size + PAGE - 1) // PAGE
        vector = (ctypes.c_ubyte * pages)()
        address = ctypes.addressof(ctypes.c_char.from_buffer(mapped))
        if _libc.mincore(ctypes.c_void_p(address), size, vector) != 0:
            raise OSError(ctypes.get_errno(), f"mincore failed on {path}")
        resident = sum(v & 1 for v in vector)
    finally:
        del address
        mapped.close()
    return min(resident * PAGE, size), size


def residency(files: Sequence[Path]) -> tuple[int, int]:
    """(bytes in the page cache, total bytes) over files."""
    cached = total = 0
    for path in files:
        c, t = resident_bytes(path)
        cached, total = cached + c, total + t
    return cached, total


def describe_residency(files: Sequence[Path]) -> str:
    cached, total = residency(files)
    return f"{cached / 1e6:.1f} of {total / 1e6:.1f} MB resident ({100 * cached / max(total, 1):.1f}%)"


def io_counters() -> dict[str, int]:
    """This process's /proc/self/io: read_bytes = bytes fetched from the storage device,
    rchar = bytes returned by read calls (page cache hits included)."""
    with open("/proc/self/io") as f:
        return {k: int(v) for k, v in (line.split(": ") for line in f)}
