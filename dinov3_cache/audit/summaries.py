"""Summaries of complete volumes for the report: one small metadata JSON per volume gives
timing, throughput, storage, sources and configuration; submission records give the
submissions."""

from __future__ import annotations

import json
import os
import shutil
import statistics
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

from dinov3_cache.audit.joblogs import PendingVolume
from dinov3_cache.audit.scan import StorageMeasure
from dinov3_cache.indices import format_ranges
from dinov3_cache.paths import VolumePaths
from dinov3_cache.schema import MetadataError, VolumeMetadata
from dinov3_cache.storage import DEFAULT_STORAGE_FORM

TIMING_ORDER = ("feature_extraction_seconds", "tensorstore_write_seconds", "total_seconds")


@dataclass
class VolumeSummary:
    index: int
    timestamp: str | None
    timing: dict[str, float]
    source: str
    fingerprint: str | None
    recorded_bytes: dict[str, int]
    array_bytes: dict[str, int] = field(default_factory=dict)
    storage_form: str = DEFAULT_STORAGE_FORM  # the name of how the features are stored (dinov3_cache/storage)


def source_label(source: dict) -> str:
    for key in ("dataset", "name"):
        if source.get(key):
            return str(source[key])
    raw = (source.get("paths") or {}).get("raw")
    return str(raw) if raw else "unknown"


def summarise_volume(index: int, metadata: VolumeMetadata) -> VolumeSummary:
    return VolumeSummary(
        index=index,
        timestamp=metadata.timestamp,
        timing={k: float(v) for k, v in metadata.timing.items()},
        source=source_label(metadata.source_dataset.to_dict()),
        fingerprint=metadata.configuration.fingerprint,
        recorded_bytes=dict(metadata.storage.bytes or {}),
        storage_form=metadata.storage_form.name,
    )


def parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    for parse in (datetime.fromisoformat, lambda t: datetime.strptime(t, "%Y-%m-%dT%H:%M:%S%z")):
        try:
            value = parse(text)
            return value if value.tzinfo else value.astimezone()
        except (ValueError, TypeError):
            continue
    return None


def read_complete_volumes(
    output_dir: Path, indices: list[int], names: list[str] | None = None
) -> tuple[list[VolumeSummary], list[dict], dict]:
    """Summaries of every complete volume (one small JSON each), the unreadable ones, and
    one configuration per fingerprint. `names`: the metadata file names, as listed."""
    summaries, problems, configs = [], [], {}
    names = names or [VolumePaths(output_dir, i).metadata.name for i in indices]
    directory = str(output_dir)
    for index, name in zip(indices, names, strict=True):
        path = os.path.join(directory, name)
        try:
            with open(path, "rb") as f:
                metadata = VolumeMetadata.from_dict(json.loads(f.read()), name)
            summary = summarise_volume(index, metadata)  # MetadataError: a storage form this version lacks
        except FileNotFoundError:
            continue  # replaced by an --overwrite run between listing and reading
        except (OSError, ValueError) as e:
            problems.append({"index": index, "problem": f"metadata file {name} is unreadable ({e})"})
            continue
        except MetadataError as e:
            problems.append({"index": index, "problem": str(e)})
            continue
        summaries.append(summary)
        configs.setdefault(summary.fingerprint, metadata.configuration.to_dict())
    return summaries, problems, configs


def describe(values: list[float]) -> dict:
    return {
        "count": len(values), "mean": statistics.fmean(values), "median": statistics.median(values),
        "min": min(values), "max": max(values),
    }


def timing_statistics(summaries: list[VolumeSummary]) -> dict:
    keys = list(TIMING_ORDER) + sorted({k for s in summaries for k in s.timing} - set(TIMING_ORDER))
    result = {}
    for key in keys:
        values = [s.timing[key] for s in summaries if key in s.timing]
        if values:
            result[key] = describe(values)
    return result


def throughput(summaries: list[VolumeSummary], submissions: list[dict], remaining: int, running: bool) -> dict:
    """Volumes per hour since the latest submission (or the first completion), and when
    the remaining volumes would be done at that rate."""
    times = sorted(t for t in (parse_time(s.timestamp) for s in summaries) if t)
    submitted = [t for t in (parse_time(r.get("submitted")) for r in submissions) if t]
    now = datetime.now(timezone.utc).astimezone()
    if submitted and any(t >= max(submitted) for t in times):
        start, done = max(submitted), [t for t in times if t >= max(submitted)]
    elif len(times) >= 2:
        start, done = times[0], times[1:]
    else:
        return {"volumes_per_hour": None, "since": None, "remaining": remaining, "estimated_finish": None}
    end = now if running else done[-1]
    hours = (end - start).total_seconds() / 3600
    rate = len(done) / hours if hours > 0 else None
    finish = None
    if rate and remaining:
        finish = (now + timedelta(hours=remaining / rate)).isoformat(timespec="minutes")
    return {"volumes_per_hour": rate, "since": start.isoformat(timespec="seconds"), "remaining": remaining, "estimated_finish": finish}


def storage_summary(
    output_dir: Path,
    summaries: list[VolumeSummary],
    pending: list[PendingVolume],
    projected_count: int,
    measure: StorageMeasure | None,
    mode: str,
) -> dict:
    by_array: dict[str, int] = {}
    for s in summaries:
        for name, n in s.array_bytes.items():
            by_array[name] = by_array.get(name, 0) + n
    total = sum(by_array.values())
    per_volume = total / len(summaries) if summaries else None
    projected = per_volume * projected_count if per_volume is not None else None
    still_needed = max(0.0, projected - total) if projected is not None else None
    free = shutil.disk_usage(output_dir).free
    return {
        "method": measure.method if measure else "recorded in metadata at write time",
        "mode": mode,
        "total_bytes": total,
        "volumes": len(summaries),
        "per_volume_mean_bytes": per_volume,
        "by_array_bytes": by_array,
        "by_array_mean_bytes": {k: v / len(summaries) for k, v in by_array.items()} if summaries else {},
        "debris_bytes": sum(p.debris_bytes for p in pending),
        "projected_count": projected_count,
        "projected_total_bytes": projected,
        "still_needed_bytes": still_needed,
        "free_bytes": free,
        "short_of_space": still_needed is not None and free < still_needed,
        "per_volume_bytes": {str(s.index): sum(s.array_bytes.values()) for s in summaries},
        "by_layout": storage_form_summary(summaries),  # the key keeps the name of --layout
    }


def storage_form_summary(summaries: list[VolumeSummary]) -> dict:
    """Per storage form (dense, tokens, ...): the volumes stored so and their bytes."""
    groups: dict[str, list[VolumeSummary]] = {}
    for s in summaries:
        groups.setdefault(s.storage_form, []).append(s)
    out = {}
    for form, members in sorted(groups.items()):
        total = sum(sum(s.array_bytes.values()) for s in members)
        out[form] = {
            "volumes": len(members), "indices": format_ranges(s.index for s in members),
            "total_bytes": total, "per_volume_mean_bytes": total / len(members),
        }
    return out


def configuration_summary(summaries: list[VolumeSummary], configs: dict) -> dict:
    counts = Counter(s.fingerprint for s in summaries)
    if not counts:
        return {"fingerprint": None, "volumes": 0, "settings": {}, "differing": []}
    majority, n = counts.most_common(1)[0]
    shared = configs.get(majority, {})
    differing = []
    for fingerprint in [f for f in counts if f != majority]:
        other = configs.get(fingerprint, {})
        changed = {
            k: {"majority": shared.get(k), "these": other.get(k)}
            for k in sorted(set(shared) | set(other))
            if k not in ("fingerprint", "fingerprint_inputs") and shared.get(k) != other.get(k)
        }
        differing.append({
            "fingerprint": fingerprint,
            "indices": [s.index for s in summaries if s.fingerprint == fingerprint],
            "differences": changed,
        })
    return {
        "fingerprint": majority, "volumes": n,
        "settings": {k: v for k, v in shared.items() if k != "fingerprint_inputs"},
        "differing": differing,
    }


def submission_summary(record: dict) -> dict:
    return {
        "submitted": record.get("submitted"),
        "scheduler": record.get("scheduler"),
        "volumes": len(record.get("indices", [])),
        "indices": format_ranges(int(i) for i in record.get("indices", [])),
        "job_ids": record.get("job_ids"),
    }

