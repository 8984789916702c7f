"""CellMap annotation encodings (cellmap-schemas ``annotation``): which stored values mean
'absent', 'present' and 'unknown' in a label array.

A crop's class group and each of its level arrays carry
``attributes.cellmap.annotation.annotation_type = {"type": ..., "encoding": {...}}``, e.g.
``{"absent": 0, "unknown": 255}`` for instance labels and
``{"absent": 0, "present": 1, "unknown": 255}`` for semantic ones; arrays also record
``complement_counts``. The array's own attributes win over its group's (downsampling can
change what a level holds). 'unknown' voxels are not labels: they decode to 0 (absent) and
leave the valid-label mask. Arrays without ``cellmap`` attributes decode as stored.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dinov3_cache.sources.base import SourceError
from dinov3_cache.sources.cellmap.store import Storage, join_url
from dinov3_cache.zarr_arrays import ATTRIBUTE_FILES, attributes_in

ANNOTATION_TYPES = {"instance_segmentation": "instance", "semantic_segmentation": "semantic"}
POSSIBILITIES = {"instance": ("absent", "unknown"), "semantic": ("absent", "present", "unknown")}
N5_ATTRIBUTES = "attributes.json"


@dataclass(frozen=True)
class AnnotationEncoding:
    """The stored value of each possibility of one label array, and where it was read."""

    kind: str  # instance | semantic
    values: dict[str, int]  # possibility -> stored value
    source: str  # URL of the node whose attributes gave it

    @property
    def unknown(self) -> int | None:
        return self.values.get("unknown")

    def decode(self, stored: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(labels, known): 'unknown' and 'absent' become 0, a semantic 'present' value 1;
        known is False where the stored value is 'unknown'."""
        known = np.ones(stored.shape, bool) if self.unknown is None else stored != self.unknown
        labels = stored
        absent = self.values.get("absent", 0)
        if self.kind == "semantic" and "present" in self.values:
            labels = (stored == self.values["present"]).astype(stored.dtype)
        elif absent != 0:
            labels = np.where(stored == absent, 0, stored).astype(stored.dtype)
        if not known.all():
            labels = np.where(known, labels, 0).astype(stored.dtype)
        return labels, known

    def to_record(self) -> dict:
        return {"type": self.kind, "encoding": dict(self.values), "from": self.source}


def parse_encoding(attributes: dict, where: str) -> AnnotationEncoding | None:
    """The encoding in a node's attributes; None where it has no cellmap annotation type."""
    cellmap = attributes.get("cellmap")
    annotation = cellmap.get("annotation") if isinstance(cellmap, dict) else None
    annotation_type = annotation.get("annotation_type") if isinstance(annotation, dict) else None
    if annotation_type is None:
        return None

    def corrupt(why: str) -> SourceError:
        return SourceError(f"corrupt cellmap annotation metadata at {where}: {why}; fix 'cellmap.annotation.annotation_type'")

    if not isinstance(annotation_type, dict) or annotation_type.get("type") not in ANNOTATION_TYPES:
        raise corrupt(f"type is not one of {', '.join(ANNOTATION_TYPES)}")
    kind = ANNOTATION_TYPES[annotation_type["type"]]
    encoding = annotation_type.get("encoding")
    if not isinstance(encoding, dict):
        raise corrupt("no 'encoding' object")
    unknown_keys = sorted(set(encoding) - set(POSSIBILITIES[kind]))
    if unknown_keys:
        raise corrupt(f"{kind} encoding has key(s) {unknown_keys}; allowed: {', '.join(POSSIBILITIES[kind])}")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in encoding.values()):
        raise corrupt(f"encoding values {encoding} are not all integers")
    if len(set(encoding.values())) != len(encoding):
        raise corrupt(f"encoding {encoding} gives two possibilities the same value")
    return AnnotationEncoding(kind, dict(sorted(encoding.items())), where)


def node_attributes(url: str, driver: str, storage: Storage) -> dict:
    """The user attributes of the group or array at url ({} where it has none)."""
    if driver == "n5":
        return storage.read_json(join_url(url, N5_ATTRIBUTES)) or {}
    zarr_format = 3 if driver == "zarr3" else 2
    document = storage.read_json(join_url(url, ATTRIBUTE_FILES[zarr_format]))
    return attributes_in(zarr_format, document) if document else {}


def read_encoding(group_url: str, level_url: str, driver: str, storage: Storage) -> AnnotationEncoding | None:
    """The level array's encoding, else its multiscale group's, else None."""
    for url in (level_url, group_url):
        encoding = parse_encoding(node_attributes(url, driver, storage), url)
        if encoding is not None:
            return encoding
    return None
