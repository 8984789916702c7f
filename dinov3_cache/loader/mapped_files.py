"""Checked chunk files kept mapped between reads (the crop copy path of chunk_copy.py).

A crop's token windows touch about a hundred small chunk files; mapping and unmapping each one
on every read (mmap, a tensor over it, munmap with its TLB shootdown on every core) cost more
than copying the bytes (docs/benchmarks.md, "Layouts: dense or tokens"). So each file is
mapped once per process and kept, by the identity of the file the reader opened and checked
(identity.chunk_file_identity: device, inode, size, modification and status-change times):

- a reader finds a mapping only through the identity of the file it has just opened, so a file
  replaced or rewritten since has another identity and is mapped (and checked) again;
- while a mapping is kept its inode stays allocated, so its number cannot be reused by a new file;
- at most MAX_MAPPED_BYTES in at most MAX_MAPPINGS files stay mapped per process, least
  recently used first out. A dropped mapping is unmapped when the last copy using it is done
  (the tensor holds the mapping).

Mapped pages are the page cache's, shared with every process reading the same files; they
count in a process's resident size while mapped. A file removed while mapped keeps its disk
space until its mapping is dropped.
"""

from __future__ import annotations

import mmap
import threading
from collections import OrderedDict
from collections.abc import Sequence

import torch

MAX_MAPPED_BYTES = 1 << 30  # per process: a few crops' chunk files, dense or tokens
MAX_MAPPINGS = 8192  # per process: each is one memory area, of at most vm.max_map_count (65530 by default)


class MappedFiles:
    """A bounded, least-recently-used set of read-only mappings of checked chunk files."""

    def __init__(self, max_bytes: int = MAX_MAPPED_BYTES, max_files: int = MAX_MAPPINGS):
        self.max_bytes, self.max_files = max_bytes, max_files
        self.mapped: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self.nbytes = 0
        self.lock = threading.Lock()

    def chunk(self, fd: int, identity: tuple, dtype: torch.dtype, shape: Sequence[int]) -> torch.Tensor:
        """The chunk file open as `fd`, whose identity is `identity`, as a tensor of `shape`
        (its size was checked), mapped private and never written."""
        key = (identity, dtype, tuple(shape))
        with self.lock:
            tensor = self.mapped.get(key)
            if tensor is not None:
                self.mapped.move_to_end(key)
                return tensor
        nbytes = dtype.itemsize * int(torch.Size(shape).numel())
        mapping = mmap.mmap(fd, nbytes, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        tensor = torch.frombuffer(mapping, dtype=torch.uint8).view(dtype).view(shape)  # holds the mapping
        with self.lock:
            if key not in self.mapped:
                self.mapped[key] = tensor
                self.nbytes += nbytes
                self._drop_oldest()
        return tensor

    def _drop_oldest(self) -> None:
        while (self.nbytes > self.max_bytes or len(self.mapped) > self.max_files) and len(self.mapped) > 1:
            _, tensor = self.mapped.popitem(last=False)
            self.nbytes -= tensor.numel() * tensor.element_size()

    def clear(self) -> None:
        with self.lock:
            self.mapped.clear()
            self.nbytes = 0


MAPPED_FILES = MappedFiles()  # one per process, like identity.VERIFIED_CHUNKS
