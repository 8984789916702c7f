"""Which files a volume reader opened, and whether its paths still hold them: how a reader
knows, after a read, that the read came from the volume it opened (VolumeReader.finish in reader.py).

A committed volume's arrays may move under an open reader (its commit directory renamed to the
seed names, docs/cache-format.md) or be replaced (an --overwrite commits another volume). A
reader checks each array's metadata file and the volume's metadata file after every read: if
the paths still hold the same files after the read, the read came from them, because a replaced
volume's arrays are removed only after the new metadata file took the old one's place.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

FileIdentity = tuple[int, int, int, int]


def identity_of(stat: os.stat_result) -> FileIdentity:
    # device and inode name the file (a rename keeps them, a replacement is another inode); the
    # modification time and size tell a new file from an old one whose inode number was reused
    return (stat.st_dev, stat.st_ino, stat.st_mtime_ns, stat.st_size)


def chunk_file_identity(stat: os.stat_result) -> tuple[int, ...]:
    """identity_of plus the status-change time, which every write and every utime() moves: a
    file rewritten in place with its old size and modification time restored is another file."""
    return (*identity_of(stat), stat.st_ctime_ns)


def file_identity(path: Path) -> FileIdentity | None:
    """The identity of the file at path now; None when there is none."""
    try:
        return identity_of(os.stat(path))
    except (FileNotFoundError, NotADirectoryError):
        return None


@dataclass(frozen=True)
class OpenedArray:
    """One array as opened, with the identity its metadata file had before it was read."""

    reader: Any  # array_readers.RawChunkReader or array_readers.TensorStoreReader
    path: Path
    metadata_file: Path
    identity: FileIdentity | None

    def unchanged(self) -> bool:
        return file_identity(self.metadata_file) == self.identity


@dataclass(frozen=True)
class OpenedVolume:
    """A volume's arrays as opened, and the identity of the metadata file that commits them."""

    arrays: dict[str, OpenedArray]
    metadata_file: Path
    metadata: FileIdentity

    def unchanged(self, arrays: Iterable[str] | None = None) -> bool:
        """Whether the metadata file and these arrays (default: all) are still the ones opened."""
        return file_identity(self.metadata_file) == self.metadata and all(
            self.arrays[a].unchanged() for a in (self.arrays if arrays is None else arrays))


@dataclass
class Read:
    """A region of one array being read into `out`: kept so that it can be read again."""

    array: str
    region: tuple[slice, ...]
    out: torch.Tensor
    opened: OpenedVolume | None = None
    futures: list = field(default_factory=list)


def changed_under(reads: Sequence[Read]) -> bool:
    """Whether any read may have come from other files than the ones opened (checked after the
    reads complete: see the module's docstring)."""
    arrays: dict[int, set[str]] = {}
    opened = {id(r.opened): r.opened for r in reads}
    for read in reads:
        arrays.setdefault(id(read.opened), set()).add(read.array)
    return not all(opened[key].unchanged(names) for key, names in arrays.items())


class VerifiedChunks:
    """The chunk files this process has checked against their recorded checksum, by file
    identity (chunk_file_identity), chunk key and recorded value: a chunk file is checked once
    per process, later reads of the same file (later epochs over a warm cache) pay nothing.
    A replaced or rewritten file has another identity and is checked again. Not inherited by
    worker processes (they are spawned, never forked); each checks what it reads, once.

    Holds hashes of the keys (a 64-bit hash per chunk), forgotten all at once past
    MAX_ENTRIES (about 60 MB), after which files are simply checked again."""

    MAX_ENTRIES = 1_000_000

    def __init__(self) -> None:
        self.hashes: set[int] = set()

    def contains(self, identity: tuple[int, ...], key: str, recorded: int) -> bool:
        return hash((identity, key, recorded)) in self.hashes

    def add(self, identity: tuple[int, ...], key: str, recorded: int) -> None:
        if len(self.hashes) >= self.MAX_ENTRIES:
            self.hashes.clear()
        self.hashes.add(hash((identity, key, recorded)))


VERIFIED_CHUNKS = VerifiedChunks()  # one per process: see VerifiedChunks
