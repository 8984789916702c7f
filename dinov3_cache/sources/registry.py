"""The sources there are, and the one place that chooses among them.

Adding a source: a `VolumeSource` subclass in its own module of `sources/` (its options,
`implied_by`, `from_settings`, `sample`, `preflight`, `fingerprint_values`), and its class in
`SOURCE_TYPES`. Nothing outside `sources/` names a source: the extraction options, the
settings file, preflight, submission and the viewer ask this module.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

from dinov3_cache.sources.base import SourceError, SourceOption, VolumeSource
from dinov3_cache.sources.cellmap.source import CellMapSource
from dinov3_cache.sources.synthetic import SyntheticSource

# --source name -> its class, in the order --source's help lists them
SOURCE_TYPES: dict[str, type[VolumeSource]] = {cls.name: cls for cls in (CellMapSource, SyntheticSource)}


@functools.cache
def declared_options() -> tuple[SourceOption, ...]:
    """Every source's options; a flag is declared by one source only."""
    options: dict[str, SourceOption] = {}
    for cls in SOURCE_TYPES.values():
        for option in cls.options:
            if option.flag in options:
                raise ValueError(f"{option.flag} is declared by two sources ({cls.name} and another)")
            options[option.flag] = option
    return tuple(options.values())


def add_source_arguments(parser: Any) -> None:
    """Every source's options (on a parser or an argument group)."""
    for option in declared_options():
        option.add_to(parser)


def add_data_location_arguments(parser: Any, help_prefix: str = "") -> None:
    """The options that say where source data is, for tools that read it again (the viewer)."""
    for option in declared_options():
        if option.locates_data:
            option.add_to(parser, help_prefix)


def pass_through_options() -> tuple[SourceOption, ...]:
    """The source options every job of a submission receives."""
    return tuple(o for o in declared_options() if o.pass_through)


def source_choice_help() -> str:
    """--source's help: each source with how it is chosen or what it is."""
    *others, last = [f"'{name}' ({cls.summary})" for name, cls in SOURCE_TYPES.items()]
    return "where crops come from: " + (f"{', '.join(others)} or {last}" if others else last)


def implied_source_name(settings: Mapping[str, Any]) -> str | None:
    """The source these option values choose without --source (a data root, say), or None."""
    return next((name for name, cls in SOURCE_TYPES.items() if cls.implied_by(settings)), None)


def source_name(settings: Mapping[str, Any]) -> str:
    """--source, else the source the other options imply; one line when neither names one."""
    chosen = settings.get("source")
    if chosen is not None:
        if chosen not in SOURCE_TYPES:
            raise SourceError(f"unknown --source {chosen!r}; choose from {', '.join(sorted(SOURCE_TYPES))}")
        return chosen
    implied = implied_source_name(settings)
    if implied is None:
        hints = [cls.choice_hint for cls in SOURCE_TYPES.values() if cls.choice_hint]
        raise SourceError("no data source given: pass " + ", or ".join(hints))
    return implied


def source_type(settings: Mapping[str, Any]) -> type[VolumeSource]:
    """The class of the source these option values choose."""
    return SOURCE_TYPES[source_name(settings)]


def source_from_settings(settings: Mapping[str, Any]) -> VolumeSource:
    """The source these option values (by argparse dest) ask for: the one way to build one."""
    return source_type(settings).from_settings(settings)


def source_for_checking(name: str, settings: Mapping[str, Any]) -> VolumeSource:
    """The source named by a recorded signature, built to re-check it from these option values."""
    return SOURCE_TYPES[name].for_checking(settings)
