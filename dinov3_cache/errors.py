"""One error type for what a user can act on, one way to print it, and the exit statuses
that every script shares (docs/exit-status.md lists them).

Each script's main() raises a subclass of `CacheToolError` whose message is one line
saying what is wrong and what to do; `report_error` prints it as `error: ...` and
returns the error's exit status. No traceback reaches the user for these.
"""

from __future__ import annotations

import argparse
import signal
import sys
from typing import NoReturn

EXIT_OK = 0  # done: complete, skipped, submitted, or the audit found nothing wrong
EXIT_FAILED = 1  # a run failed, or expected volumes are not complete
EXIT_USAGE = 2  # bad input on the command line (argparse uses 2 as well); nothing was done
EXIT_LOCKED = 3  # another live run holds the volume; nothing was touched
EXIT_DAMAGED = 4  # verification found damage, or a metadata file is unreadable
EXIT_STALE = 5  # --check-sources: a volume's source changed where its crop was read
EXIT_UNREACHABLE = 6  # --check-sources: a volume's source cannot be read (gone, or the store unreachable)


def exit_status_for_signal(signum: int) -> int:
    """The shell's convention for a process stopped by a signal: 128 + its number."""
    return 128 + int(signum)


EXIT_INTERRUPTED = exit_status_for_signal(signal.SIGINT)  # 130: Ctrl-C
EXIT_TERMINATED = exit_status_for_signal(signal.SIGTERM)  # 143: a scheduler's walltime or kill


class CacheToolError(Exception):
    """A failure a user can act on; the message is one line: what is wrong and what to do."""

    exit_status = EXIT_FAILED


class UsageError(CacheToolError):
    """Bad input found before any work started."""

    exit_status = EXIT_USAGE


class CacheError(CacheToolError):
    """A cache that cannot be loaded as asked; the message says what to do."""


def first_line(error: BaseException, limit: int = 500) -> str:
    """The first non-empty line of an error's message (its type name when it has none)."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return (lines[0].strip() if lines else type(error).__name__)[:limit]


def named_first_line(error: BaseException) -> str:
    """'TypeName: first line', for status records and job logs where the type helps."""
    return f"{type(error).__name__}: {first_line(error)}"


def report_error(error: CacheToolError, stream=None) -> int:
    """Print `error: ...` (one line) and return the error's exit status."""
    print(f"error: {first_line(error, limit=2000)}", file=stream or sys.stderr)
    return error.exit_status


class OneLineParser(argparse.ArgumentParser):
    """argparse that answers bad input with one `error:` line (usage only on --help)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"error: {message} (see {self.prog} --help)\n")
