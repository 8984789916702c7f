"""Reading one zarr array's region into a preallocated tensor, checking chunk checksums on the
way: `RawChunkReader` for uncompressed zarr v2 (the file's bytes are the chunk in C order, read
straight into a reused buffer), `TensorStoreReader` for everything else. `open_reader` picks one
and refuses an array that differs from what the volume's metadata recorded. Why two readers:
reader.py's notes and benchmarks/bench_loader_read.py."""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tensorstore as ts
import torch

from dinov3_cache.array_form import array_owner_problem
from dinov3_cache.chunk_files import chunk_file_map, chunk_nbytes, may_be_missing, missing_written_chunks, present_files
from dinov3_cache.loader.chunk_copy import OpenChunk, SlabCopier, slab_groups
from dinov3_cache.loader.identity import (
    VERIFIED_CHUNKS,
    chunk_file_identity,
)
from dinov3_cache.loader.volumes import CachedVolume
from dinov3_cache.storage.dtypes import TORCH_DTYPES, numpy_view, stored_torch_dtype
from dinov3_cache.zarr_arrays import (
    ArrayMetadata,
    chunk_key,
    crc32_of,
    open_array,
    read_attributes,
)


class RawChunkReader:
    """Uncompressed zarr v2: a chunk file this process has not checked yet is read whole into a
    reused per-thread buffer, checked and copied; checked ones are copied slab by slab through a
    small staging buffer (chunk_copy.py). Either way one file read and one copy per byte; the
    copy is torch's (vectorised, casts on the fly: float16 on disk -> float32 tensor in one pass)."""

    def __init__(self, path: Path, array: ArrayMetadata, executor: ThreadPoolExecutor, recorded: dict[str, int], verify: bool):
        self.path = path
        self.root = os.path.join(path, "")  # chunk paths by concatenation: one per chunk read
        self.recorded, self.verify = recorded, verify
        self.shape, self.chunks = array.shape, array.chunks
        self.dtype = stored_torch_dtype(array.dtype)
        self.file_map = chunk_file_map(array)
        self.fill_value = array.document.get("fill_value") or 0
        self.chunk_nbytes = int(np.prod(self.chunks)) * self.dtype.itemsize
        self.executor = executor
        self.local = threading.local()
        self.copier = SlabCopier(self.chunks, self.dtype)

    def read_into(self, region: tuple[slice, ...], out: torch.Tensor) -> list[Future]:
        """Start reading `region` into `out` (a tensor of the region's shape, any dtype): one
        task per slab of chunks (chunk_copy.py)."""
        return [self.executor.submit(self._copy_slab, group, out) for group in slab_groups(list(chunk_overlaps(region, self.chunks)))]

    def _copy_slab(self, overlaps, out: torch.Tensor) -> None:
        """Chunks read for the first time in this process are read whole and checked, then
        copied; the others (checked before, by the identity of the file now open) are copied
        together by SlabCopier."""
        checked = []
        try:
            for grid_index, src, dst in overlaps:
                opened = self._open_chunk(grid_index, dst, out)
                if opened is None:
                    continue
                fd, identity = opened
                if self.verify and not self._verified(grid_index, identity):
                    try:
                        self._copy_checked(fd, identity, grid_index, src, dst, out)
                    finally:
                        os.close(fd)
                else:
                    checked.append(OpenChunk(fd, identity, grid_index, src, dst))
            if checked:
                self.copier.copy(checked, out)
        finally:
            for file in checked:
                os.close(file.fd)

    def _open_chunk(self, grid_index, dst: tuple[slice, ...], out: torch.Tensor) -> tuple[int, tuple[int, ...]] | None:
        """The chunk file open, and its identity from the same fd (whatever its path holds later);
        None after filling `dst` where the writer skipped the chunk."""
        key = self.file_map.chunk_file(grid_index)
        try:
            fd = os.open(self.root + key, os.O_RDONLY)
        except FileNotFoundError:
            self._check_skipped(grid_index)
            out[dst].fill_(self.fill_value)  # a chunk the writer skipped (all fill value), as TensorStore gives
            return None
        try:
            stat = os.fstat(fd)
            if stat.st_size != self.chunk_nbytes:
                raise OSError(f"chunk {key} is {stat.st_size} bytes, an uncompressed chunk must be {self.chunk_nbytes}")
        except BaseException:
            os.close(fd)
            raise
        return fd, chunk_file_identity(stat)

    def _copy_checked(self, fd: int, identity, grid_index, src: tuple[slice, ...], dst: tuple[slice, ...], out: torch.Tensor) -> None:
        """Read the whole chunk (one this process has not checked yet), check it, copy."""
        buffer = self._buffer()
        read = read_fully(fd, buffer)
        if read != self.chunk_nbytes:
            raise OSError(f"chunk {self.file_map.chunk_file(grid_index)}: the file ended after {read} of {self.chunk_nbytes} bytes")
        self._check_crc(grid_index, buffer, identity)
        chunk = torch.from_numpy(buffer).view(self.dtype).view(self.chunks)
        out[dst].copy_(chunk[src])

    def _verified(self, grid_index, identity: tuple[int, ...]) -> bool:
        recorded = self.recorded.get(chunk_key(grid_index))
        return recorded is not None and VERIFIED_CHUNKS.contains(identity, chunk_key(grid_index), recorded)

    def _valid_extent(self, grid_index) -> tuple[slice, ...]:
        return tuple(slice(0, min(c, s - g * c)) for g, c, s in zip(grid_index, self.chunks, self.shape))

    def _check_skipped(self, grid_index) -> None:
        key = chunk_key(grid_index)
        nbytes = chunk_nbytes(grid_index, self.chunks, self.shape, self.dtype.itemsize)
        if not may_be_missing(self.recorded.get(key), nbytes, self.fill_value):
            raise OSError(f"chunk {key}: the file is missing, but the writer wrote data there")

    def _check_crc(self, grid_index, buffer: np.ndarray, identity: tuple[int, ...]) -> None:
        """Check the chunk's bytes (cropped to the array at its edges, as the writer summed them)
        and remember this file as checked."""
        key = chunk_key(grid_index)
        recorded = self.recorded.get(key)
        elements = buffer.view(f"u{self.dtype.itemsize}").reshape(self.chunks)  # any dtype, bfloat16 too
        check_chunk_crc(key, recorded, elements[self._valid_extent(grid_index)])
        VERIFIED_CHUNKS.add(identity, key, recorded)

    def _buffer(self) -> np.ndarray:
        buffer = getattr(self.local, "buffer", None)
        if buffer is None:
            buffer = self.local.buffer = np.empty(self.chunk_nbytes, np.uint8)
        return buffer


def read_fully(fd: int, buffer: np.ndarray) -> int:
    """Fill `buffer` from the file's current position; the bytes read (fewer only at end of file).
    One read may legally return fewer bytes than asked without being at the end (NFS, Lustre,
    signals), so read until the buffer is full or a read returns nothing."""
    view = memoryview(buffer).cast("B")
    done = 0
    while done < len(view):
        read = os.readv(fd, [view[done:]])
        if read == 0:
            break
        done += read
    return done


def check_chunk_crc(key: str, recorded: int | None, data: np.ndarray) -> None:
    if recorded is None:
        raise OSError(f"chunk {key} has no recorded checksum (verify_checksums needs one)")
    found = crc32_of(data)
    if found != int(recorded):
        raise OSError(f"chunk {key} fails its checksum (crc32 {found}, recorded {recorded}): the bytes are damaged")


class TensorStoreReader:
    """Any zarr v2/v3 array, compressed or sharded: TensorStore writes the region straight
    into the destination array (no intermediate result array), converting the dtype.
    With verify, each chunk is read on its own, checked, then copied."""

    def __init__(
        self, path: Path, array: ArrayMetadata, context: ts.Context, executor: ThreadPoolExecutor, recorded: dict[str, int], verify: bool
    ):
        self.store = open_array(path, context, array.zarr_format)
        self.shape = tuple(self.store.shape)
        self.recorded, self.verify, self.executor = recorded, verify, executor
        self.chunks = array.chunks
        self.path, self.file_map = path, chunk_file_map(array)
        self.fill_value = array.document.get("fill_value")
        if recorded:  # once per open: a chunk written with data whose file is gone is damage, not zeros
            missing = missing_written_chunks(array, self.file_map, present_files(path), recorded)
            if missing:
                raise OSError(f"chunk {chunk_key(missing[0])} is missing ({len(missing)} chunk(s) in all), but the writer wrote data there")

    def read_into(self, region: tuple[slice, ...], out: torch.Tensor) -> list[Future]:
        if not self.verify:
            return [self._destination(out).write(self.store[region])]
        overlaps = list(chunk_overlaps(region, self.chunks))
        before = self._identities(overlaps)
        if all(self._verified(g, before) for g, _, _ in overlaps):  # every file checked already: one read
            return [self.executor.submit(self._copy_verified_region, region, out, overlaps, before)]
        return [self.executor.submit(self._copy_checked_chunk, grid_index, src, dst, out) for grid_index, src, dst in overlaps]

    def _identities(self, overlaps) -> dict[str, tuple[int, ...] | None]:
        """Identity of each chunk (or shard) file the chunks are in; None where there is none."""
        identities = {}
        for grid_index, _, _ in overlaps:
            key = self.file_map.chunk_file(grid_index)
            if key not in identities:
                try:
                    identities[key] = chunk_file_identity(os.stat(self.path / key))
                except (FileNotFoundError, NotADirectoryError):
                    identities[key] = None
        return identities

    def _verified(self, grid_index, identities: dict) -> bool:
        """Whether the chunk's file was checked already, or is absent where the writer skipped
        a fill-valued chunk (TensorStore reads the fill value, which is what was recorded)."""
        identity = identities[self.file_map.chunk_file(grid_index)]
        recorded = self.recorded.get(chunk_key(grid_index))
        if recorded is None:
            return False
        if identity is None:
            nbytes = chunk_nbytes(grid_index, self.chunks, self.shape, self.store.dtype.numpy_dtype.itemsize)
            return may_be_missing(recorded, nbytes, self.fill_value)
        return VERIFIED_CHUNKS.contains(identity, chunk_key(grid_index), recorded)

    def _copy_verified_region(self, region, out: torch.Tensor, overlaps, before: dict) -> None:
        """Read the region in one go; if a file changed meanwhile, read it again chunk by chunk, checked."""
        self._destination(out).write(self.store[region]).result()
        if self._identities(overlaps) != before:
            for grid_index, src, dst in overlaps:
                self._copy_checked_chunk(grid_index, src, dst, out)

    def _copy_checked_chunk(self, grid_index, src, dst, out: torch.Tensor) -> None:
        extent = tuple(slice(g * c, min(s, (g + 1) * c)) for g, c, s in zip(grid_index, self.chunks, self.shape))
        key, file_key = chunk_key(grid_index), self.file_map.chunk_file(grid_index)
        before = self._identities([(grid_index, None, None)])[file_key]
        chunk = self.store[extent].read().result()
        recorded = self.recorded.get(key)
        # the bytes came from the file `before` names only if its path held it before and after the read
        same_file = before is not None and recorded is not None and self._identities([(grid_index, None, None)])[file_key] == before
        if not (same_file and VERIFIED_CHUNKS.contains(before, key, recorded)):
            check_chunk_crc(key, recorded, chunk)
            if same_file:
                VERIFIED_CHUNKS.add(before, key, recorded)
        self._destination(out[dst]).write(chunk[src]).result()

    def _destination(self, out: torch.Tensor):
        array = numpy_view(out)
        if array.dtype == np.bool_ and self.store.dtype.numpy_dtype == np.uint8:
            array = array.view(np.uint8)  # masks: 0/1 bytes on disk, bool in torch
        return ts.array(array, copy=False, write=True)


def open_reader(
    path: Path, array: ArrayMetadata, mode: str, context: ts.Context, executor: ThreadPoolExecutor, recorded: dict[str, int], verify: bool
):
    verify = verify and bool(recorded)  # a volume written before checksums were recorded reads unchecked
    if mode == "auto" and raw_readable(array):
        return RawChunkReader(path, array, executor, recorded, verify)
    return TensorStoreReader(path, array, context, executor, recorded, verify)


def array_form_problem(volume: CachedVolume, array: str, path: Path, stored: ArrayMetadata, reader) -> str | None:
    """What makes an array not the one the metadata describes (checked at every open; the
    numbers come from files the open reads anyway, plus the array's attributes)."""
    metadata = volume.metadata
    expected = tuple(metadata.shapes[array])
    if reader.shape != expected:
        return f"shape {list(reader.shape)} on disk, metadata says {list(expected)}"
    dtype = stored_dtype_name(reader)
    if dtype != metadata.dtypes.get(array):
        return f"dtype {dtype} on disk, metadata says {metadata.dtypes.get(array)}"
    recorded_chunks = metadata.integrity.chunks.get(array) if metadata.integrity else None
    if recorded_chunks is not None and tuple(reader.chunks) != tuple(recorded_chunks):
        return f"chunk shape {list(reader.chunks)} on disk, metadata says {list(recorded_chunks)}"
    attributes = read_attributes(path, stored)
    if volume.commit_id is not None:
        written_by = (attributes.get("dinov3_cache") or {}).get("commit_id")
        if written_by != volume.commit_id:
            return f"the array was written by another run (commit id {written_by}, metadata says {volume.commit_id})"
    return array_owner_problem(attributes, volume.index)


def stored_dtype_name(reader) -> str:
    if isinstance(reader, RawChunkReader):
        return "bfloat16" if reader.dtype == torch.bfloat16 else str(reader.dtype).removeprefix("torch.")
    return str(reader.store.dtype.numpy_dtype)


def raw_readable(array: ArrayMetadata) -> bool:
    """Whether the array's chunk files are plain C-order bytes (zarr v2, no compressor or filters)."""
    zarray = array.document
    return (
        array.zarr_format == 2
        and zarray.get("compressor") is None
        and not zarray.get("filters")
        and zarray.get("order", "C") == "C"
        and plain_dtype(zarray["dtype"])
        and isinstance(zarray.get("fill_value", 0), (int, float, type(None)))
    )


def plain_dtype(dtype) -> bool:
    """Little-endian (or single-byte) numbers torch can hold; bfloat16 is TensorStore's extension."""
    if dtype == "bfloat16":
        return True
    return isinstance(dtype, str) and dtype[:1] in "<|" and dtype[1:2] in "fiub" and np.dtype(dtype).name in TORCH_DTYPES


def chunk_overlaps(region: Sequence[slice], chunks: Sequence[int]):
    """(chunk grid index, slices within the chunk, slices within the region) for every
    chunk the region touches."""
    ranges = []
    for r, c in zip(region, chunks):
        first, last = r.start // c, (r.stop - 1) // c
        ranges.append([(i, max(r.start, i * c), min(r.stop, (i + 1) * c)) for i in range(first, last + 1)])
    for parts in itertools.product(*ranges):
        grid_index = tuple(p[0] for p in parts)
        src = tuple(slice(lo - i * c, hi - i * c) for (i, lo, hi), c in zip(parts, chunks))
        dst = tuple(slice(lo - r.start, hi - r.start) for (_, lo, hi), r in zip(parts, region))
        yield grid_index, src, dst
