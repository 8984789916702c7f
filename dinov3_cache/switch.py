"""`Switch`: an on/off option together with its opposite, so that the command line can turn
off what a settings file turned on (argparse.BooleanOptionalAction, except that an option
already named --no-X gets --X as its opposite rather than --no-no-X)."""

from __future__ import annotations

import argparse
from typing import Any


def opposite_flag(flag: str) -> str:
    """--save-raw -> --no-save-raw; --no-space-check -> --space-check."""
    return "--" + flag.removeprefix("--no-") if flag.startswith("--no-") else "--no-" + flag.removeprefix("--")


class Switch(argparse.Action):
    """The named flag stores True, its opposite False; the last one given wins."""

    def __init__(self, option_strings: list[str], dest: str, default: Any = False, **kwargs: Any):
        super().__init__([*option_strings, opposite_flag(option_strings[0])], dest, nargs=0, default=default, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, option_string != self.option_strings[-1])

    def format_usage(self) -> str:
        return " | ".join(self.option_strings)
