"""Which files hold an array's chunks (zarr v2: one per chunk; v3: one per shard), which of
them exist, and whether a missing one may be missing: the writer skips a chunk equal to
the fill value, and records its checksum like any other, so a missing chunk is legitimate
exactly when its recorded checksum is that of a fill-valued chunk."""

from __future__ import annotations

import functools
import math
import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from dinov3_cache.layout import iter_files
from dinov3_cache.zarr_arrays import chunk_slices, dtype_itemsize, read_array_metadata


@dataclass
class StoredLayout:
    """How an array's chunks map to files: zarr v2 one file per chunk, v3 one per shard."""

    unit: tuple[int, ...]  # region covered by one file
    key_prefix: str
    separator: str
    uncompressed_nbytes: int | None  # exact file size where it is known (v2 without compressor)

    def file_key(self, unit_index: Sequence[int]) -> str:
        return self.key_prefix + self.separator.join(map(str, unit_index))


def stored_layout(path: Path, itemsize: int) -> StoredLayout:
    array = read_array_metadata(path)
    meta = array.document
    if array.zarr_format == 2:
        size = math.prod(array.chunks) * itemsize if meta.get("compressor") is None and not meta.get("filters") else None
        return StoredLayout(array.chunks, "", meta.get("dimension_separator", "."), size)
    encoding = meta.get("chunk_key_encoding") or {"name": "default"}
    default = encoding.get("name") == "default"
    separator = (encoding.get("configuration") or {}).get("separator", "/" if default else ".")
    prefix = "c" + separator if default else ""
    return StoredLayout(tuple(meta["chunk_grid"]["configuration"]["chunk_shape"]), prefix, separator, None)


def present_files(path: Path) -> dict[str, int]:
    """Relative path -> size of every file below the array that could hold chunks."""
    files = {}
    for entry in iter_files(path):
        rel = os.path.relpath(entry.path, path).replace(os.sep, "/")
        if not rel.startswith((".z", "zarr.json")):
            try:
                files[rel] = entry.stat(follow_symlinks=False).st_size
            except FileNotFoundError:
                pass
    return files


@functools.lru_cache(maxsize=64)
def fill_chunk_crc32(nbytes: int) -> int:
    """The recorded checksum of a chunk the writer skipped: all bytes zero (the writer's fill
    value is 0), edge chunks cropped."""
    return zlib.crc32(bytes(nbytes))


def missing_written_chunks(
    path: Path, shape: Sequence[int], chunks: Sequence[int], dtype: str, recorded: dict[str, int]
) -> list[str]:
    """Chunk keys whose file is missing although the recorded checksum says the writer wrote
    data other than the fill value (one listing of the array; zarr v3 per shard file)."""
    itemsize = dtype_itemsize(dtype)
    layout = stored_layout(path, itemsize)
    files = present_files(path)
    missing = []
    for grid_index, slices in chunk_slices(shape, chunks):
        unit = tuple(g * c // u for g, c, u in zip(grid_index, chunks, layout.unit))
        if layout.file_key(unit) in files:
            continue
        key = ".".join(map(str, grid_index))
        nbytes = math.prod(s.stop - s.start for s in slices) * itemsize
        if key in recorded and int(recorded[key]) != fill_chunk_crc32(nbytes):
            missing.append(key)
    return missing
