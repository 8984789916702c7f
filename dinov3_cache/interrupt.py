"""Ctrl-C in a script: exit status 130 and one `error:` line, never a KeyboardInterrupt traceback,
whether it comes while torch is still being imported (seconds) or during the work.

Each script imports its heavy modules inside `try: ... except KeyboardInterrupt:
exit_if_script(__name__)`, and runs `sys.exit(run_script(main))`. Imported as a library, the
module lets Ctrl-C raise as usual. This module imports nothing heavy."""

from __future__ import annotations

import sys
from collections.abc import Callable

EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C


def interrupted_line(what: str = "") -> str:
    return f"error: {what + ': ' if what else ''}interrupted by the user (Ctrl-C); nothing more was done"


def exit_if_script(module_name: str) -> None:
    """In an `except KeyboardInterrupt:` around a script's imports: exit 130 with one line when
    the module runs as a script, else re-raise (a library user's Ctrl-C is theirs)."""
    if module_name != "__main__":
        raise  # the KeyboardInterrupt being handled
    print(interrupted_line("while starting"), file=sys.stderr)
    sys.exit(EXIT_INTERRUPTED)


def run_script(main: Callable[[], int]) -> int:
    """main()'s exit status; a Ctrl-C that main() does not handle itself gives one line and 130."""
    try:
        return main()
    except KeyboardInterrupt:
        print(interrupted_line(), file=sys.stderr)
        return EXIT_INTERRUPTED
