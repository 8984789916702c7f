"""What files take on disk: walking a tree without extra stats, and its size as du counts it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path


def iter_files(root: Path) -> Iterator[os.DirEntry]:
    """Every regular file below root, via scandir (no extra stat on most file systems)."""
    stack = [root]
    while stack:
        try:
            entries = os.scandir(stack.pop())
        except FileNotFoundError:
            continue
        with entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                elif entry.is_file(follow_symlinks=False):
                    yield entry


def bytes_on_disk(root: Path) -> int:
    """Bytes allocated on disk below root, or by root itself when it is a file (like du),
    which is what storage planning needs. Files that vanish while running jobs commit or
    clean up are skipped."""
    try:
        if not root.is_dir() or root.is_symlink():
            return root.lstat().st_blocks * 512
    except FileNotFoundError:
        return 0
    total = 0
    for entry in iter_files(root):
        try:
            total += entry.stat(follow_symlinks=False).st_blocks * 512
        except FileNotFoundError:
            pass
    return total
