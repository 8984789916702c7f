"""Source signatures: what a volume's source held when the crop was read, recorded in its
metadata (``source_dataset.signature``), and the verdict of comparing it with the source now
(``check_preprocessing.py --check-sources``).

A signature names the source that wrote it (``source``) and its ``format``; that source knows
how to re-check it (`VolumeSource.check_signature`). The CellMap source records, per array
read, digests of its metadata documents and, per storage chunk the read touched, an identity of
the chunk (size, mtime and sha256 of a local file; size and ETag of an S3 object) and a digest
of the values the crop took from it (cellmap/signing.py). The synthetic source records its
generator, parameters and seed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dinov3_cache.json_schema import MetadataError
from dinov3_cache.records import canonical_json

SIGNATURE_FORMAT = 1
CURRENT, STALE, UNREACHABLE, NO_SIGNATURE = "current", "stale", "unreachable", "no_signature"
SOURCE_STATUSES = (CURRENT, STALE, UNREACHABLE, NO_SIGNATURE)
HASH_BLOCK = 1 << 20
DIGEST_HEX = 32  # chunk digests keep sha256's first 128 bits: hundreds of chunks per volume stay a small file


class SignatureError(MetadataError):
    """A recorded signature does not have the shape its source writes: the metadata is damaged."""


@dataclass
class Change:
    """One difference between the signature and the source now."""

    array: str  # 'raw' or an organelle
    what: str  # 'metadata' (a metadata document) or 'chunks' (values the crop read)
    items: list[str]  # the documents or chunk keys that differ
    inside_crop: bool  # the values the crop read differ (metadata changes count as inside)

    def describe(self) -> str:
        shown = ", ".join(self.items[:6]) + (f" and {len(self.items) - 6} more" if len(self.items) > 6 else "")
        where = "inside the crop region" if self.inside_crop else "outside the crop region"
        return f"{self.array}: {self.what} {shown} changed {where}"

    def to_record(self) -> dict:
        return {"array": self.array, "what": self.what, "items": self.items, "inside_crop": self.inside_crop}


@dataclass
class SourceStatus:
    """One volume's verdict: `status` is one of SOURCE_STATUSES; `detail` one line saying why."""

    status: str
    detail: str = ""
    changes: list[Change] = field(default_factory=list)
    chunks_compared: int = 0  # chunk identities compared with the source
    chunks_hashed: int = 0  # of those, read and hashed because size and mtime could not decide
    changed_outside: int = 0  # chunks whose bytes changed while the values the crop read did not
    not_located: bool = False  # the given data root or catalog does not hold the volume's arrays

    def to_record(self, index: int) -> dict:
        return {
            "index": index, "source_status": self.status, "detail": self.detail,
            "changes": [c.to_record() for c in self.changes], "chunks_compared": self.chunks_compared,
            "chunks_hashed": self.chunks_hashed, "chunks_changed_outside_crop": self.changed_outside,
        }


def combine(statuses: list[SourceStatus]) -> SourceStatus:
    """One verdict from per-array ones: a change found is stale, else anything unreachable is."""
    changes = [c for s in statuses for c in s.changes]
    inside = [c for c in changes if c.inside_crop]
    unreachable = [s for s in statuses if s.status == UNREACHABLE]
    if inside:
        status, detail = STALE, "; ".join(c.describe() for c in inside)
    elif unreachable:
        status, detail = UNREACHABLE, unreachable[0].detail
    else:
        status, detail = CURRENT, "; ".join(c.describe() for c in changes)
    return SourceStatus(
        status, detail, changes,
        chunks_compared=sum(s.chunks_compared for s in statuses), chunks_hashed=sum(s.chunks_hashed for s in statuses),
        changed_outside=sum(s.changed_outside for s in statuses), not_located=any(s.not_located for s in statuses),
    )


# ----------------------------------------------------------------------------- digests


def document_digest(document: Any) -> str | None:
    """sha256 of a JSON document as parsed (formatting does not count); None when absent."""
    return None if document is None else hashlib.sha256(canonical_json(document).encode()).hexdigest()


def values_digest(values: np.ndarray) -> str:
    """sha256 (first 128 bits) of an array's dtype, shape and values."""
    digest = hashlib.sha256(f"{values.dtype.str}{values.shape}".encode())
    digest.update(np.ascontiguousarray(values).data)
    return digest.hexdigest()[:DIGEST_HEX]


def file_sha256(path: str) -> str:
    """sha256 (first 128 bits) of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()[:DIGEST_HEX]


# ----------------------------------------------------------------------------- reading a recorded signature


def field_of(record: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    """record[key] of the given type; SignatureError (damage) naming the key otherwise."""
    value = record.get(key) if isinstance(record, dict) else None
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):  # a bool is no int here
        raise SignatureError(f"{where}: source signature key '{key}' is missing or malformed; the metadata is damaged")
    return value
