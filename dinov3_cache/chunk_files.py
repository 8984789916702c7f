"""Which files hold an array's chunks (zarr v2: one per chunk; v3: one per shard), which of
them exist, and whether a missing one may be missing (`may_be_missing`, the one rule the
audit and the loader apply): the writer skips a chunk equal to the fill value, and records
its checksum like any other, so a missing chunk is legitimate exactly when its recorded
checksum is that of a fill-valued chunk."""

from __future__ import annotations

import functools
import math
import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from dinov3_cache.disk import iter_files
from dinov3_cache.zarr_arrays import ArrayMetadata, chunk_key, chunk_slices


@dataclass
class ChunkFileMap:
    """How an array's chunks map to files: zarr v2 one file per chunk, v3 one per shard."""

    chunks: tuple[int, ...]  # the read/write chunk
    unit: tuple[int, ...]  # region covered by one file
    key_prefix: str
    separator: str
    uncompressed_nbytes: int | None  # exact file size where it is known (v2 without compressor)

    def file_key(self, unit_index: Sequence[int]) -> str:
        return self.key_prefix + self.separator.join(map(str, unit_index))

    def chunk_file(self, grid_index: Sequence[int]) -> str:
        """The file holding the chunk at grid_index."""
        return self.file_key(tuple(g * c // u for g, c, u in zip(grid_index, self.chunks, self.unit, strict=True)))


def chunk_file_map(array: ArrayMetadata) -> ChunkFileMap:
    meta = array.document
    if array.zarr_format == 2:
        plain = meta.get("compressor") is None and not meta.get("filters")
        size = math.prod(array.chunks) * array.itemsize if plain else None
        return ChunkFileMap(array.chunks, array.chunks, "", meta.get("dimension_separator") or ".", size)
    encoding = meta.get("chunk_key_encoding") or {"name": "default"}
    default = encoding.get("name") == "default"
    separator = (encoding.get("configuration") or {}).get("separator", "/" if default else ".")
    prefix = "c" + separator if default else ""
    return ChunkFileMap(array.chunks, tuple(meta["chunk_grid"]["configuration"]["chunk_shape"]), prefix, separator, None)


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


def chunk_nbytes(grid_index: Sequence[int], chunks: Sequence[int], shape: Sequence[int], itemsize: int) -> int:
    """Bytes of one chunk's data, edge chunks cropped (what its checksum covers)."""
    return itemsize * math.prod(min(c, s - g * c) for g, c, s in zip(grid_index, chunks, shape, strict=True))


def may_be_missing(recorded: int | None, nbytes: int, fill_value) -> bool:
    """Whether a chunk's file may legitimately be absent: the chunk held the fill value (its
    recorded checksum is that of a zero-filled chunk, and the fill value is 0), or no checksum
    was recorded (an older cache: the fill value, as zarr reads it)."""
    return recorded is None or (not fill_value and int(recorded) == fill_chunk_crc32(nbytes))


def missing_written_chunks(
    array: ArrayMetadata, file_map: ChunkFileMap, files: dict[str, int], recorded: dict[str, int]
) -> list[tuple[int, ...]]:
    """Grid indices of the chunks whose file is not in `files` (present_files of the array)
    although the recorded checksum says the writer wrote data there (zarr v3: per shard file)."""
    fill_value = array.document.get("fill_value")
    missing = []
    for grid_index, _ in chunk_slices(array.shape, array.chunks):
        if file_map.chunk_file(grid_index) in files:
            continue
        nbytes = chunk_nbytes(grid_index, array.chunks, array.shape, array.itemsize)
        if not may_be_missing(recorded.get(chunk_key(grid_index)), nbytes, fill_value):
            missing.append(grid_index)
    return missing
