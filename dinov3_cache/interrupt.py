"""Ctrl-C in a script: exit status 130 and one `error:` line, never a KeyboardInterrupt traceback,
whether it comes while torch is still being imported (seconds) or during the work.

A script imports its heavy modules inside `with ctrl_c_exits_at_once(__name__):` and runs
`sys.exit(run_script(main))`; imported as a library, nothing changes. This module imports
nothing heavy."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Callable, Iterator

from dinov3_cache.errors import EXIT_INTERRUPTED


def interrupted_line(what: str = "") -> str:
    return f"error: {what + ': ' if what else ''}interrupted by the user (Ctrl-C); nothing more was done"


@contextlib.contextmanager
def ctrl_c_exits_at_once(module_name: str) -> Iterator[None]:
    """In a module run as a script (`__main__`): Ctrl-C exits 130 at once with one line while
    the block runs. A KeyboardInterrupt raised inside a native module's initialisation (torch,
    TensorStore) surfaces as an ImportError traceback, so during imports the signal must not
    become an exception at all."""
    if module_name != "__main__":
        yield
        return
    previous = signal.signal(signal.SIGINT, _exit_now)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _exit_now(signum, frame) -> None:
    sys.stderr.write(interrupted_line("while starting") + "\n")
    sys.stderr.flush()
    os._exit(EXIT_INTERRUPTED)  # only imports were running: nothing to clean up


def run_script(main: Callable[[], int]) -> int:
    """main()'s exit status; a Ctrl-C that main() does not handle itself gives one line and 130."""
    try:
        return main()
    except KeyboardInterrupt:
        print(interrupted_line(), file=sys.stderr)
        return EXIT_INTERRUPTED
