"""--check-sources: each complete volume's recorded source signature against its source now.

Every metadata file is read first and the sources it names are built from the command line's
source options (a CellMap cache needs --data-root or --catalog): bad input is one line before
any source data is read. Then each volume's source compares the signature (reading metadata,
chunk sizes and mtimes or ETags, and only where those differ the chunk and the crop's values in
it). Volumes written before signatures existed report `no_signature`; a malformed signature is
damage, reported with the metadata problems.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dinov3_cache.audit.scan import AuditError
from dinov3_cache.json_schema import MetadataError
from dinov3_cache.paths import VolumePaths
from dinov3_cache.schema import VolumeMetadata, load_volume_metadata
from dinov3_cache.sources.base import SourceError, VolumeSource
from dinov3_cache.sources.signatures import NO_SIGNATURE, SOURCE_STATUSES, SignatureError, SourceStatus


def signed_volumes(output_dir: Path, indices: list[int]) -> tuple[dict[int, VolumeMetadata], list[dict]]:
    """The metadata of each volume, and the problems of those that cannot be read (damage)."""
    found, problems = {}, []
    for index in indices:
        try:
            found[index] = load_volume_metadata(VolumePaths(output_dir, index).metadata)
        except MetadataError as e:
            problems.append({"index": index, "problem": str(e)})
    return found, problems


def sources_for(names: set[str], settings: Mapping[str, Any], option: str) -> dict[str, VolumeSource]:
    """One source per name the signatures give, built from the options; AuditError (bad input) when they do not locate it."""
    from dinov3_cache.sources.registry import source_for_checking

    try:
        return {name: source_for_checking(name, settings) for name in sorted(names)}
    except SourceError as e:
        raise AuditError(f"{option}: {e}") from None


def check_volume(source: VolumeSource | None, metadata: VolumeMetadata) -> SourceStatus:
    signature = metadata.source_dataset.signature
    if signature is None:
        return SourceStatus(NO_SIGNATURE, "written before source signatures were recorded; recompute it to check it")
    return source.check_signature(signature.to_dict(), metadata.source_dataset.to_dict())


def check_sources(
    output_dir: Path, indices: list[int], settings: Mapping[str, Any], option: str = "--check-sources"
) -> tuple[dict, list[dict]]:
    """The source check of these volumes (a report section) and the damage it found; `option`
    names the command-line option that asked for it in error lines."""
    started = time.perf_counter()
    from dinov3_cache.sources.registry import SOURCE_TYPES

    volumes, problems = signed_volumes(output_dir, indices)
    for index, metadata in list(volumes.items()):
        signature = metadata.source_dataset.signature
        if signature is not None and signature.source not in SOURCE_TYPES:
            problems.append({"index": index, "problem": f"volume {index}: its source signature names an unknown source {signature.source!r}; the metadata is damaged"})
            del volumes[index]
    names = {m.source_dataset.signature.source for m in volumes.values() if m.source_dataset.signature is not None}
    sources = sources_for(names, settings, option)
    statuses: dict[int, SourceStatus] = {}
    for index, metadata in volumes.items():
        signature = metadata.source_dataset.signature
        try:
            statuses[index] = check_volume(sources.get(signature.source) if signature else None, metadata)
        except SignatureError as e:
            problems.append({"index": index, "problem": f"volume {index}: {e}"})
    located = [s for s in statuses.values() if s.status != NO_SIGNATURE]
    if located and all(s.not_located for s in located):
        raise AuditError(
            f"{option}: the given --data-root / --catalog holds none of the arrays these volumes were read from; "
            "pass the data root or catalog the extraction used"
        )
    return section(statuses, time.perf_counter() - started), problems


def section(statuses: dict[int, SourceStatus], seconds: float) -> dict:
    counts = Counter(s.status for s in statuses.values())
    return {
        "checked": len(statuses),
        "counts": {status: counts.get(status, 0) for status in SOURCE_STATUSES},
        "chunks_compared": sum(s.chunks_compared for s in statuses.values()),
        "chunks_hashed": sum(s.chunks_hashed for s in statuses.values()),
        "chunks_changed_outside_crop": sum(s.changed_outside for s in statuses.values()),
        "seconds": round(seconds, 3),
        "volumes": [statuses[i].to_record(i) for i in sorted(statuses)],
    }


def summary_line(check: dict) -> str:
    c = check["counts"]
    return (
        f"{check['checked']} volume(s) checked: {c['current']} current, {c['stale']} stale, {c['unreachable']} unreachable, "
        f"{c['no_signature']} without signature; {check['chunks_compared']} chunk(s) compared "
        f"({check['chunks_hashed']} hashed, {check['chunks_changed_outside_crop']} changed outside every crop) in {check['seconds']:.1f} s"
    )
