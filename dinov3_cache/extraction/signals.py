"""How extraction treats SIGTERM and Ctrl-C (SIGINT). A scheduler's SIGTERM becomes
`Terminated` (raise_on_sigterm), so a killed job records why. From a volume's commit on both
are held (hold_signals): the committed volume's job exits 0, and a run with more volumes
stops before the next one (raise_on_sigterm raises the held signal then). Only in a run whose
SIGTERM handler raise_on_sigterm installed (the script): a library caller's handlers are its own."""

from __future__ import annotations

import signal
import threading

HELD_SIGNALS = (signal.SIGTERM, signal.SIGINT)
DEFERRED_SIGNALS: list[int] = []  # signals held since a commit started
_HANDLERS_BEFORE_HOLD: dict[int, object] = {}


class Terminated(Exception):
    """SIGTERM arrived (a scheduler's walltime or kill): the run records it and cleans up."""

    def __init__(self, signum: int):
        super().__init__(f"terminated by signal {signum} (a walltime or scheduler kill); rerun to finish the volume")
        self.signum = signum


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated(signum)


def _hold(signum: int, frame: object) -> None:
    DEFERRED_SIGNALS.append(signum)


def raise_on_sigterm() -> None:
    """Turn SIGTERM into `Terminated`; a SIGTERM or Ctrl-C held during an earlier volume's
    commit is raised now, before the next volume starts."""
    held = release_held_signals()
    if held == signal.SIGINT:
        raise KeyboardInterrupt
    if held is not None:
        raise Terminated(held)
    signal.signal(signal.SIGTERM, _raise_terminated)


def hold_signals() -> None:
    """From the commit on, SIGTERM and Ctrl-C must not fail the run: the volume is (about to
    be) complete, and a job whose volume is complete exits 0. A signal is held, not lost."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) is not _raise_terminated:
        return
    for signum in HELD_SIGNALS:
        handler = signal.getsignal(signum)
        if callable(handler) and handler is not _hold:  # an ignored signal stays ignored
            _HANDLERS_BEFORE_HOLD[signum] = handler
            signal.signal(signum, _hold)


def release_held_signals() -> int | None:
    """On the main thread: the handlers from before the hold come back; returns the first
    signal held meanwhile (None when none came)."""
    for signum, handler in _HANDLERS_BEFORE_HOLD.items():
        signal.signal(signum, handler)
    _HANDLERS_BEFORE_HOLD.clear()
    held = DEFERRED_SIGNALS[0] if DEFERRED_SIGNALS else None
    DEFERRED_SIGNALS.clear()
    return held


def ignore_late_signals(as_script: bool) -> None:
    """The run's outcome is decided: a SIGTERM or Ctrl-C from now on must not change its exit
    status. In a script both are ignored up to the exit, through the interpreter's teardown
    (Python puts the default handlers back there, and tearing down torch and TensorStore takes
    up to a second: a signal then killed a finished job with 143 or 130). Called as a library,
    the caller's handlers come back instead."""
    if as_script:
        for signum in HELD_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)
        _HANDLERS_BEFORE_HOLD.clear()
        DEFERRED_SIGNALS.clear()
    else:
        release_held_signals()
