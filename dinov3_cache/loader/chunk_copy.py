"""Copying checked uncompressed chunk files into a region's tensor slab by slab
(RawChunkReader in array_readers.py; measured in benchmarks/bench_loader_read.py and
bench_loader_crop_rate.py; docs/loader.md, "Why it reads the way it does").

Why not chunk by chunk: with the default chunks (256,16,16,16) a chunk lands in a (C, D, H, W)
tensor as runs of 16 values, half a 64-byte cache line in float16. Copied one chunk at a time,
each destination line is written in two halves 2 MB of copying apart, after it left the core's
cache in between: fetched and written back twice. Here the chunks that share a slab of the
destination (the same grid index on all but the last two axes, e.g. the same channel block and
z block; at most MAX_FILES of them) are copied together, a few channels at a time, so that the
destination's lines are complete before they leave the cache:
- where the chunks tile the slab (whole volumes), the channels' rows of every chunk are read
  (pread) into one small staging buffer and moved in one strided copy;
- otherwise (crops, chunks cut at the volume edge) they are copied from the chunk files mapped
  read-only (kept mapped between reads: mapped_files.py): only the pages a crop needs are
  touched, nothing goes through a buffer; rows whole and aligned on both sides, in the same
  dtype (token windows, start_read in storage/tokens.py), move 16 bytes per element (`widened`);
- a chunk whose rows land as whole runs of the destination, in the stored dtype (chunks spanning
  the trailing axes), is read straight into it (preadv), no copy at all.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

from dinov3_cache.loader.mapped_files import MAPPED_FILES

STAGE_BYTES = 1 << 20  # staging buffer per thread: fits a core's L2 beside the destination lines
MAX_FILES = 8  # chunk files one copy task holds open (small tasks: all read threads busy)
IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024


class OpenChunk(NamedTuple):
    """A checked chunk file, open, and the part of it a read copies."""

    fd: int
    identity: tuple[int, ...]  # of the open file (identity.chunk_file_identity)
    grid_index: tuple[int, ...]
    src: tuple[slice, ...]  # within the chunk
    dst: tuple[slice, ...]  # within the region read


def slab_groups(overlaps: Sequence) -> list[list]:
    """The (grid index, src, dst) overlaps grouped by grid index on all but the last two axes,
    each group split into pieces of whole rows of chunks (at most MAX_FILES files, unless one
    row has more). Chunks in one group share src and dst on the leading axes."""
    groups: dict[tuple, list] = {}
    for overlap in overlaps:
        groups.setdefault(tuple(overlap[0][:-2]), []).append(overlap)
    pieces = []
    for group in groups.values():
        row = sum(1 for o in group if o[0][:-1] == group[0][0][:-1])
        size = row * max(1, MAX_FILES // row)
        pieces.extend(group[i:i + size] for i in range(0, len(group), size))
    return pieces


def widened(source: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(source, target) viewed as 16-byte elements when both hold whole 16-byte pieces along
    their last axis, aligned, in the same dtype; else as they are. torch copies runs this short
    element by element at about the same cost per element whatever its size: 8 float16 tokens
    moved as one element copy twice as fast (and 16-byte elements beat 8-, 4- and 2-byte ones)."""
    ratio = 16 // source.element_size()
    if source.dtype != target.dtype or ratio < 2 or source.shape[-1] % ratio:
        return source, target
    for tensor in (source, target):
        if tensor.stride(-1) != 1 or tensor.storage_offset() % ratio or any(s % ratio for s in tensor.stride()[:-1]):
            return source, target
    return source.view(torch.complex128), target.view(torch.complex128)


def preadv_fully(fd: int, views: list[memoryview], offset: int) -> int:
    """Fill the buffers in turn from the file at `offset` (IOV_MAX of them per call); the bytes read."""
    done, first = 0, 0
    views = list(views)
    while first < len(views):
        read = os.preadv(fd, views[first:first + IOV_MAX], offset + done)
        if read == 0:
            break
        done += read
        while first < len(views) and read >= len(views[first]):
            read -= len(views[first])
            first += 1
        if read:
            views[first] = views[first][read:]
    return done


def row_views(out: torch.Tensor, dst: tuple[slice, ...]) -> list[memoryview]:
    """Byte views of out[dst]'s rows along axis 0, each one contiguous run of `out`'s memory."""
    if not out.is_contiguous():
        return [memoryview(row.numpy()).cast("B") for row in out[dst].view(torch.uint8).flatten(1)]
    memory = memoryview(out.view(torch.uint8).numpy()).cast("B")  # one view of the whole tensor, sliced per row
    first = out[(dst[0].start, *(s.start for s in dst[1:]))].storage_offset() - out.storage_offset()
    step, size = out.stride(0) * out.element_size(), out[(0, *dst[1:])].numel() * out.element_size()
    start = first * out.element_size()
    return [memory[start + i * step:start + i * step + size] for i in range(dst[0].stop - dst[0].start)]


class SlabCopier:
    """Copies the part of every chunk file in one slab group (OpenChunk) into `out` (see the
    module's docstring)."""

    def __init__(self, chunks: Sequence[int], dtype: torch.dtype):
        self.chunks, self.dtype = tuple(chunks), dtype
        self.row_bytes = int(np.prod(self.chunks[1:])) * dtype.itemsize  # one index of axis 0, contiguous in the file
        self.local = threading.local()

    def copy(self, files: Sequence[OpenChunk], out: torch.Tensor) -> None:
        files = [f for f in files if not self._read_direct(f, out)]
        if not files:
            return
        tiled = self._tiling(files)
        if tiled is not None:
            self._copy_staged(files, out, tiled)
        else:
            self._copy_mapped(files, out)

    def _block(self, files: Sequence[OpenChunk]) -> int:
        """Indices of axis 0 copied at a time: the slab's rows of that many fit STAGE_BYTES."""
        extent = files[0].src[0].stop - files[0].src[0].start
        return max(1, min(extent, STAGE_BYTES // (len(files) * self.row_bytes)))

    def _copy_mapped(self, files: Sequence[OpenChunk], out: torch.Tensor) -> None:
        """Copy from the files' pages in the page cache (the checked files mapped, mapped_files.py):
        a crop reads only the parts of its edge chunks it needs, and no byte passes through a
        buffer first."""
        pairs = [widened(MAPPED_FILES.chunk(f.fd, f.identity, self.dtype, self.chunks)[f.src], out[f.dst]) for f in files]
        extent, block = pairs[0][0].shape[0], self._block(files)
        if block >= extent:
            for chunk, target in pairs:
                target.copy_(chunk)
            return
        for first in range(0, extent, block):
            count = min(block, extent - first)
            for chunk, target in pairs:
                target.narrow(0, first, count).copy_(chunk.narrow(0, first, count))

    def _read_direct(self, file: OpenChunk, out: torch.Tensor) -> bool:
        """Read the chunk straight into `out` when each of its axis-0 rows lands there as one run
        (chunks spanning the array's trailing axes, e.g. --chunks 256,16,128,128 for 128^3) in the
        stored dtype: one preadv, no copy at all. False when it cannot."""
        fd, _, grid_index, src, dst = file
        if out.dtype != self.dtype or len(self.chunks) < 2:
            return False
        whole_rows = all(s.start == 0 and s.stop == c for s, c in zip(src[1:], self.chunks[1:]))
        if not whole_rows or not out[(dst[0].start, *dst[1:])].is_contiguous():
            return False
        views = row_views(out, dst)
        if preadv_fully(fd, views, src[0].start * self.row_bytes) != len(views) * self.row_bytes:
            raise OSError(f"chunk {'.'.join(map(str, grid_index))}: the file ended early")
        return True

    def _copy_staged(self, files: Sequence[OpenChunk], out: torch.Tensor, tiled: tuple[int, int]) -> None:
        """Read every file's rows of a block of axis 0 into the staging buffer, then copy them
        into `out` in one strided copy; block after block."""
        src0, dst0 = files[0].src[0], files[0].dst[0]
        extent, block = src0.stop - src0.start, self._block(files)
        stage = self._stage(len(files) * block * self.row_bytes).view(self.dtype).view(len(files), block, *self.chunks[1:])
        for first in range(0, extent, block):
            count = min(block, extent - first)
            self._read_rows(files, stage, src0.start + first, count)
            rows = slice(dst0.start + first, dst0.start + first + count)
            self._copy_tiled(files, stage[:, :count], out, rows, tiled)

    def _read_rows(self, files, stage: torch.Tensor, first: int, count: int) -> None:
        nbytes = count * self.row_bytes
        buffer = memoryview(stage.view(torch.uint8).numpy()).cast("B")
        stride = stage.shape[1] * self.row_bytes
        for j, file in enumerate(files):
            if preadv_fully(file.fd, [buffer[j * stride:j * stride + nbytes]], first * self.row_bytes) != nbytes:
                raise OSError(f"chunk {'.'.join(map(str, file.grid_index))}: the file ended early")

    def _tiling(self, files) -> tuple[int, int] | None:
        """(rows, columns) of chunks when the files are whole chunks on the last two axes that
        tile a rectangle in grid order (so one strided copy moves them all); else None."""
        if len(self.chunks) < 3:
            return None
        if not all(s.start == 0 and s.stop == c for f in files for s, c in zip(f.src[-2:], self.chunks[-2:])):
            return None
        grid = [f.grid_index[-2:] for f in files]
        ys, xs = sorted({g[0] for g in grid}), sorted({g[1] for g in grid})
        expected = [(y, x) for y in ys for x in xs]
        if grid != expected or ys != list(range(ys[0], ys[0] + len(ys))) or xs != list(range(xs[0], xs[0] + len(xs))):
            return None
        return len(ys), len(xs)

    def _copy_tiled(self, files, stage: torch.Tensor, out: torch.Tensor, rows: slice, tiled: tuple[int, int]) -> None:
        ny, nx = tiled
        cy, cx = self.chunks[-2:]
        first_dst, last_dst = files[0].dst, files[-1].dst
        target = out[(rows, *first_dst[1:-2], slice(first_dst[-2].start, last_dst[-2].stop), slice(first_dst[-1].start, last_dst[-1].stop))]
        target = target.unflatten(-1, (nx, cx)).unflatten(-3, (ny, cy))  # (rows, *middle, ny, cy, nx, cx)
        middle = len(self.chunks) - 3  # axes between axis 0 and the last two (z for features)
        source = stage[(slice(None), slice(None), *files[0].src[1:-2])].unflatten(0, (ny, nx))
        order = [2, *range(3, 3 + middle), 0, 3 + middle, 1, 4 + middle]
        target.copy_(source.permute(order))

    def _stage(self, nbytes: int) -> torch.Tensor:
        stage = getattr(self.local, "stage", None)
        if stage is None or stage.numel() < nbytes:
            stage = self.local.stage = torch.empty(max(nbytes, STAGE_BYTES), dtype=torch.uint8)
        return stage[:nbytes]


def single_threaded_torch() -> None:
    """Thread initializer of the read threads: their torch copies run on the calling thread alone.
    The read threads already divide the work; a copy that also forks an OpenMP team per call
    (torch's default for tensors over 32768 elements) puts threads x OpenMP threads on the cores,
    whose spinning waits cost 2-3x on a busy 2-core machine (bench_loader_read.py). OpenMP's
    thread count is per calling thread, so the caller's own torch threads are unchanged; without
    an OpenMP runtime in the process there is nothing to change."""
    torch.get_num_threads()  # torch sets this thread's OpenMP count on first use: let it, then override
    try:
        set_threads = ctypes.CDLL(None).omp_set_num_threads
    except (AttributeError, OSError, TypeError):  # no OpenMP runtime, or no process symbol table (Windows)
        return
    set_threads(1)
