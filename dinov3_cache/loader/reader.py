"""Fast reads of a cached volume's arrays (which volumes are visible: volumes.py).

`VolumeReader` reads any region of
a volume's features / gt / mask into arrays the caller allocated (a batch slot, pinned
memory), so no array is allocated or copied twice.

Why reads go into preallocated arrays, and why uncompressed zarr v2 chunks are read
without TensorStore's decode (measured in benchmarks/bench_loader_read.py):

- `store.read()` allocates and fills a new result array, then copies each decoded chunk
  into it: about 2x the CPU time of writing the same store into an existing array
  (`ts.array(out).write(store)`), which skips the extra allocation pass.
- For an uncompressed zarr v2 chunk the bytes on disk are the chunk in C order. TensorStore
  reads the file into a buffer, decodes (copies) it into a chunk array, then copies that into
  the output: three passes over the data. Reading the file straight into a reused per-thread
  buffer and copying it once into the output (`RawChunkReader`; files checked before are
  copied slab by slab, mapped, or read straight into the output: chunk_copy.py) does two, and is what makes
  the default format (uncompressed v2) read faster than zarr-python 3.
- Whatever the reader, the copy into a (C, D, H, W) array is a scatter of runs as long as
  the chunk's x extent (16 float16 = 32 bytes with the default chunks): that copy, not the
  disk or the page cache, is what limits a warm whole-volume read.

Compressed or zarr v3 (sharded) arrays go through TensorStore (`TensorStoreReader`); both readers
live in array_readers.py.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import tensorstore as ts
import torch

from dinov3_cache.array_form import expected_form, form_problem
from dinov3_cache.errors import first_line
from dinov3_cache.loader.array_readers import array_form_problem, open_reader
from dinov3_cache.loader.chunk_copy import single_threaded_torch
from dinov3_cache.loader.identity import (
    FileIdentity,
    OpenedArray,
    OpenedVolume,
    Read,
    changed_under,
    file_identity,
)
from dinov3_cache.loader.volumes import CachedVolume, CacheError, VolumeReadError, volume_changed_error, volume_read_error
from dinov3_cache.zarr_arrays import (
    METADATA_FILES,
    read_array_metadata,
    ts_context,
    zarr_format_of,
)

READER_CHOICES = ("auto", "tensorstore")
SPATIAL_ARRAYS = ("gt", "mask")


# ----------------------------------------------------------------------------- one volume


def wait_for(reads: Sequence[Read]) -> tuple[Read, Exception] | None:
    """Wait for every read (all of them, even after a failure); the first failure."""
    failure = None
    for read in reads:
        for future in read.futures:
            try:
                future.result()
            except Exception as e:  # noqa: BLE001
                failure = failure or (read, e)
    return failure


class VolumeReader:
    """Reads regions of one volume's arrays; every failure names the volume and array.

    Arrays that moved after they were opened (their commit finished: the commit directory's
    arrays took the seed names) are opened again where they are now and the read is repeated;
    a volume replaced or removed while being read is an error, never its values."""

    def __init__(
        self, volume: CachedVolume, mode: str, context: ts.Context, executor: ThreadPoolExecutor, verify: bool = True
    ):
        self.volume = volume
        self.mode, self.context, self.executor, self.verify = mode, context, executor, verify
        self.lock = threading.Lock()
        self.opened = self._open(volume.current_identity(volume.identity))

    def _open(self, metadata: FileIdentity) -> OpenedVolume:
        arrays = [self.volume.metadata.storage_form.array_name, *(a for a in SPATIAL_ARRAYS if a != "mask" or self.volume.has_mask)]
        return OpenedVolume({array: self._open_array(array) for array in arrays}, self.volume.paths.metadata, metadata)

    def _open_array(self, array: str) -> OpenedArray:
        path = self.volume.array_path(array)
        try:
            return self._open_array_at(array, path)
        except VolumeReadError:
            if self.volume.array_path(array) == path:
                raise
            return self._open_array_at(array, self.volume.array_path(array))  # it moved while being opened

    def _open_array_at(self, array: str, path: Path) -> OpenedArray:
        volume = self.volume
        try:
            metadata_file = path / METADATA_FILES[zarr_format_of(path)]
            identity = file_identity(metadata_file)  # before reading it: a later replacement fails the next check
            stored = read_array_metadata(path)  # parsed once per array and open
            problem = form_problem(stored, expected_form(volume.metadata, array))  # before decoding anything by it
            if problem is None:
                reader = open_reader(path, stored, self.mode, self.context, self.executor, volume.recorded_checksums(array), self.verify)
                problem = array_form_problem(volume, array, path, stored, reader)
        except Exception as e:  # noqa: BLE001 - any open failure is reported the same way
            raise volume_read_error(volume.index, array, path, first_line(e)) from None
        if problem is not None:
            raise volume_read_error(volume.index, array, path, problem)
        return OpenedArray(reader, path, metadata_file, identity)

    def shape(self, array: str) -> tuple[int, ...]:
        return tuple(self.opened.arrays[array].reader.shape)

    def chunks(self, array: str) -> tuple[int, ...]:
        return tuple(self.opened.arrays[array].reader.chunks)

    def start_read(self, spatial: tuple[slice, ...], outputs: dict[str, torch.Tensor]) -> list[Read]:
        """Start reading the region into outputs[array] (features get all channels)."""
        return [
            self.start_region(array, ((slice(0, self.shape(array)[0]),) if array == "features" else ()) + spatial, out)
            for array, out in outputs.items()
        ]

    def start_region(self, array: str, region: tuple[slice, ...], out: torch.Tensor) -> Read:
        """Start reading `region` of `array` into `out` (a tensor of the region's shape)."""
        read = Read(array, region, out)
        self._start(read)
        return read

    def _start(self, read: Read) -> None:
        read.opened = self.opened
        source = read.opened.arrays[read.array]
        try:
            read.futures = source.reader.read_into(read.region, read.out)
        except Exception as e:  # noqa: BLE001
            raise volume_read_error(self.volume.index, read.array, source.path, first_line(e)) from None

    def finish(self, pending: list[Read]) -> None:
        """Wait for every read; then, if a file read may have moved or been replaced meanwhile,
        open the arrays again where they are now and read again (once); then report the first
        failure (a failure caused by the move is not one)."""
        failure = wait_for(pending)
        if changed_under(pending):
            self._reopen()
            for read in pending:
                self._start(read)
            failure = wait_for(pending)
            if changed_under(pending):
                self.volume.current_identity(pending[0].opened.metadata)  # replaced or removed: says so
                raise volume_changed_error(self.volume, "moved twice")
        if failure is not None:
            read, e = failure
            raise volume_read_error(self.volume.index, read.array, read.opened.arrays[read.array].path, first_line(e))

    def _reopen(self) -> None:
        """Open the arrays where they are now, unless another thread did already; an error
        when the volume was replaced or removed."""
        with self.lock:
            if not self.opened.unchanged():
                self.opened = self._open(self.volume.current_identity(self.opened.metadata))


class ReadResources:
    """Per-process TensorStore context and copy threads; created lazily so that nothing
    TensorStore-related exists before a worker process starts."""

    def __init__(self, num_threads: int, mode: str, verify_checksums: bool = True):
        if mode not in READER_CHOICES:
            raise CacheError(f"reader must be one of {', '.join(READER_CHOICES)}, got {mode!r}")
        if num_threads <= 0:
            raise CacheError(f"num_threads must be positive, got {num_threads}")
        self.num_threads, self.mode, self.verify_checksums = num_threads, mode, verify_checksums
        self.context = ts_context(num_threads)
        self.executor = ThreadPoolExecutor(num_threads, thread_name_prefix="cache-read", initializer=single_threaded_torch)
        self.readers: dict[int, VolumeReader] = {}
        self.lock = threading.Lock()

    def reader(self, volume: CachedVolume) -> VolumeReader:
        with self.lock:
            if volume.index not in self.readers:
                self.readers[volume.index] = VolumeReader(
                    volume, self.mode, self.context, self.executor, self.verify_checksums
                )
            return self.readers[volume.index]

    def close(self) -> None:
        self.executor.shutdown(wait=True)
