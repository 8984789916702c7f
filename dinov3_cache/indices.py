"""Volume index lists: the '10 15 23-40' syntax every script accepts, and the ways of
writing a list back (for people, and for a scheduler's array)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from dinov3_cache.errors import UsageError

MAX_VOLUME_INDEX = 999_999  # volume_XXXXXX: six digits in every file name


def parse_index_list(tokens: Sequence[str], option: str = "--indices") -> list[int]:
    """'10 15 23-40' or '10,15,23-40' -> sorted unique indices (ranges inclusive)."""
    if isinstance(tokens, str):
        tokens = [tokens]
    indices: set[int] = set()
    for token in (t for text in tokens for t in str(text).split(",")):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", token.strip())
        if not match and re.fullmatch(r"-\d+", token.strip()):
            check_index(int(token), option)  # a negative index: the message of any index out of range
        if not match:
            raise UsageError(f"{option}: {token!r} is not an index or a range A-B; write e.g. {option} 10 15 23-40")
        first, last = int(match.group(1)), int(match.group(2) or match.group(1))
        if last < first:
            raise UsageError(f"{option}: range {token!r} runs backwards; write it as {last}-{first}")
        check_index(last, option)
        indices.update(range(first, last + 1))
    if not indices:
        raise UsageError(f"{option} needs at least one index, e.g. {option} 10 15 23-40")
    return sorted(indices)


def check_index(index: int, option: str = "--volume-index") -> int:
    if not 0 <= index <= MAX_VOLUME_INDEX:
        raise UsageError(f"{option} must be between 0 and {MAX_VOLUME_INDEX} (six digits in the file names), got {index}")
    return index


def runs(indices: Iterable[int]) -> list[tuple[int, int]]:
    """Sorted unique indices as inclusive runs: [0, 1, 2, 5] -> [(0, 2), (5, 5)]."""
    result: list[tuple[int, int]] = []
    for value in sorted(set(indices)):
        if result and value == result[-1][1] + 1:
            result[-1] = (result[-1][0], value)
        else:
            result.append((value, value))
    return result


def format_ranges(indices: Iterable[int], separator: str = ", ") -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8' for people; separator ',' gives the array syntax
    LSF and SLURM share ('0-2,5,7-8')."""
    return separator.join(str(a) if a == b else f"{a}-{b}" for a, b in runs(indices))


def format_some(indices: Sequence[int], limit: int = 12) -> str:
    """The first `limit` indices and how many there are in all, for error messages."""
    shown = ", ".join(map(str, indices[:limit]))
    return shown + (f", ... ({len(indices)} in all)" if len(indices) > limit else "")
