"""Typed JSON documents: value types (JsonType), objects whose keys are documented fields
(Part), reading with messages that name the file and the key, writing back what was read.
The metadata schema (schema.py) is written in these terms."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from dinov3_cache.errors import EXIT_DAMAGED, CacheToolError


class MetadataError(CacheToolError):
    """A metadata document is unreadable or does not match its schema version."""

    exit_status = EXIT_DAMAGED


# ----------------------------------------------------------------------------- JSON value types


def _same(value: Any) -> Any:
    return copy.deepcopy(value)  # parts are frozen: no caller shares a mutable value with them


@dataclass(frozen=True)
class JsonType:
    """A JSON value's type: its name (for messages and the reference), a check, and how the
    value is held in Python (lists as tuples) and written back."""

    name: str
    check: Callable[[Any], bool]
    load: Callable[[Any], Any] = _same
    dump: Callable[[Any], Any] = _same
    entries: JsonType | None = None  # the type of each entry of an object: messages name the bad entry


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _scalar(name: str, check: Callable[[Any], bool]) -> JsonType:
    return JsonType(name, check, lambda v: v, lambda v: v)  # immutable: nothing to copy


INT = _scalar("int", lambda v: isinstance(v, int) and not isinstance(v, bool))
NUMBER = _scalar("number", _is_number)
STRING = _scalar("string", lambda v: isinstance(v, str))
BOOL = _scalar("bool", lambda v: isinstance(v, bool))
OBJECT = JsonType("object", lambda v: isinstance(v, dict))


def _grouped(name: str) -> str:
    return f"({name})" if " or " in name else name


def list_of(item: JsonType) -> JsonType:
    return JsonType(f"list of {_grouped(item.name)}", lambda v: isinstance(v, list) and all(map(item.check, v)),
                    lambda v: tuple(map(item.load, v)), lambda v: list(map(item.dump, v)))


def map_of(item: JsonType) -> JsonType:
    return JsonType(f"object of {_grouped(item.name)}",
                    lambda v: isinstance(v, dict) and all(isinstance(k, str) and item.check(x) for k, x in v.items()),
                    lambda v: {k: item.load(x) for k, x in v.items()}, lambda v: {k: item.dump(x) for k, x in v.items()},
                    entries=item)


def nullable(item: JsonType) -> JsonType:
    return JsonType(f"{item.name} or null", lambda v: v is None or item.check(v),
                    lambda v: None if v is None else item.load(v), lambda v: None if v is None else item.dump(v))


def json_key(doc: str, kind: JsonType | type, since: int | None = 1, shown_as: tuple[str, str] | None = None) -> Any:
    """A documented key. since: the schema version from which the key is required (None:
    never required); kind: its JsonType or the Part class of a nested object; shown_as:
    (key, type) for the reference where the field stands for several keys."""
    return field(default=None, metadata={"doc": doc, "kind": kind, "since": since, "shown_as": shown_as})


def describe(value: Any) -> str:
    kind = {bool: "bool", int: "int", float: "number", str: "string", list: "list", dict: "object"}.get(type(value), "null")
    text = json.dumps(value)
    return f"{kind} {text[:60] + '...' if len(text) > 60 else text}"


# ----------------------------------------------------------------------------- parts


@dataclass(frozen=True)
class Reading:
    source: str  # the file (or "metadata") named in every message
    version: int  # the rules to apply: min(document version, SCHEMA_VERSION)


@dataclass(frozen=True, kw_only=True)
class Part:
    """One JSON object of the document. `extra`: keys this schema does not know, kept as read;
    `absent`: optional keys the document did not have, so that writing it back adds none."""

    extra: dict = field(default_factory=dict)
    absent: frozenset = frozenset()

    @classmethod
    def schema_fields(cls) -> list:
        return [f for f in fields(cls) if "doc" in f.metadata]

    @classmethod
    def _prepare(cls, doc: dict, reading: Reading, where: str) -> dict:
        return doc

    def _finish(self, doc: dict) -> dict:
        return doc

    @classmethod
    def _parse(cls, doc: Any, reading: Reading, where: str):
        if not isinstance(doc, dict):
            raise MetadataError(f"{reading.source}: {where or 'the document'} must be an object, got {describe(doc)}")
        doc = cls._prepare(doc, reading, where)
        values, absent = {}, set()
        for f in cls.schema_fields():
            path = f"{where}.{f.name}" if where else f.name
            if f.name not in doc:
                since = f.metadata["since"]
                if since is not None and reading.version >= since:
                    raise MetadataError(
                        f"{reading.source}: required key '{path}' is missing (schema version {reading.version}); "
                        "the file is damaged or is not a cache volume's metadata"
                    )
                absent.add(f.name)
                continue
            values[f.name] = parse_value(f.metadata["kind"], doc[f.name], reading, path)
        known = {f.name for f in cls.schema_fields()}
        extra = {k: copy.deepcopy(v) for k, v in doc.items() if k not in known}
        return cls(**values, extra=extra, absent=frozenset(absent))

    def to_dict(self) -> dict:
        doc = {}
        for f in self.schema_fields():
            if f.name not in self.absent:
                doc[f.name] = dump_value(f.metadata["kind"], getattr(self, f.name))
        return self._finish(doc) | copy.deepcopy(self.extra)


def parse_value(kind: JsonType | type, value: Any, reading: Reading, path: str) -> Any:
    if isinstance(kind, type):
        return kind._parse(value, reading, path)
    if not kind.check(value):
        if kind.entries is not None and isinstance(value, dict):
            for name, entry in value.items():
                parse_value(kind.entries, entry, reading, f"{path}[{json.dumps(name)}]")
        raise MetadataError(f"{reading.source}: key '{path}' must be {kind.name}, got {describe(value)}")
    return kind.load(value)


def dump_value(kind: JsonType | type, value: Any) -> Any:
    if value is None:
        return None
    return value.to_dict() if isinstance(kind, type) else kind.dump(value)
