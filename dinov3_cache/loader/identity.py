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


def file_identity(path: Path) -> FileIdentity | None:
    """The identity of the file at path now; None when there is none."""
    try:
        return identity_of(os.stat(path))
    except (FileNotFoundError, NotADirectoryError):
        return None


@dataclass(frozen=True)
class OpenedArray:
    """One array as opened, with the identity its metadata file had before it was read."""

    reader: Any  # reader.RawChunkReader or reader.TensorStoreReader
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
