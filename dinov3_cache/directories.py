"""What every script and the loader refuse as a cache directory, said once: an empty value
(it would mean the current directory) and a path that exists but is not a directory."""

from __future__ import annotations

import os
from pathlib import Path


def directory_problem(path: str | os.PathLike) -> str | None:
    """Why `path` cannot be a cache directory, as the end of a sentence naming it; None when it can."""
    if str(path).strip() == "":
        return "is empty; name the cache directory (an empty value would write into the current directory)"
    try:
        is_file = Path(path).exists() and not Path(path).is_dir()
    except OSError:  # e.g. a parent this user may not search: the reader says so when it opens it
        return None
    if is_file:
        return f"{path} is a file, not a directory; name the cache directory"
    return None
