"""The audit report: progress, failures, timing, storage, sources and configuration of a
feature cache, and the verdict with its exit status.

The report is built for directories of thousands of volumes while jobs still run: one
listing of the output directory and one of logs/, the small metadata JSON of each
complete volume, status records and log tails only for volumes that are not complete,
and one `du` (run concurrently) for the storage measure. Nothing here writes to the cache,
and nothing here reads an array (verify.py does, when asked).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from dinov3_cache.audit.joblogs import PendingVolume, SchedulerLogs, classify_pending
from dinov3_cache.audit.live_jobs import mark_vanished_jobs
from dinov3_cache.audit.scan import AuditError, StorageMeasure, expected_volumes, scan_directory
from dinov3_cache.audit.summaries import (
    configuration_summary,
    read_complete_volumes,
    storage_summary,
    submission_summary,
    throughput,
    timing_statistics,
)
from dinov3_cache.cluster.submissions import read_submission_records, submissions_dir
from dinov3_cache.commit_protocol import dead_debris
from dinov3_cache.disk import bytes_on_disk
from dinov3_cache.errors import EXIT_DAMAGED, EXIT_FAILED, EXIT_OK, EXIT_STALE, EXIT_UNREACHABLE
from dinov3_cache.indices import format_ranges
from dinov3_cache.paths import ARRAY_NAMES, VolumePaths

if TYPE_CHECKING:
    from dinov3_cache.audit.verify import VolumeCheck

EXIT_INCOMPLETE = EXIT_FAILED  # an expected volume is not complete


@dataclass
class Report:
    output_dir: str
    generated: str
    expected: dict
    counts: dict
    complete: list[int]
    missing: list[int]
    outside_expected: list[int]
    running: list[dict]
    failed: list[dict]
    partial: list[dict]
    not_started: list[int]
    metadata_problems: list[dict]
    timing: dict
    throughput: dict
    storage: dict
    sources: dict
    configuration: dict
    submissions: list[dict]
    warnings: list[str] = field(default_factory=list)
    verification: dict | None = None
    previews: list[dict] = field(default_factory=list)
    source_check: dict | None = None  # --check-sources (source_check.py)
    exit_status: int = EXIT_OK
    verdict: str = ""

    def to_json(self) -> str:
        """One line (the C encoder; indenting would switch to the slow pure-Python one)."""
        return json.dumps({f.name: getattr(self, f.name) for f in fields(self)}, default=str)


def gather_report(
    output_dir: Path,
    explicit_indices: list[int] | None = None,
    log_lines: int = 5,
    storage: str = "measured",
) -> Report:
    """Everything the report shows, without reading any array."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        raise AuditError(f"--output-dir {output_dir} is not a directory; pass the cache directory given to the jobs")
    measure = StorageMeasure(output_dir) if storage == "measured" else None
    scan = scan_directory(output_dir)
    warnings: list[str] = []
    try:
        submissions = read_submission_records(output_dir)
    except (OSError, ValueError) as e:
        submissions = []
        warnings.append(f"submission records under {submissions_dir(output_dir)} are unreadable ({e}); ignoring them")
    complete = scan.complete()
    expectation = expected_volumes(explicit_indices, submissions, scan.known_indices())
    complete_set, expected_set = set(complete), set(expectation.indices)

    summaries, metadata_problems, configs = read_complete_volumes(
        output_dir, complete, [scan.entries[i]["metadata"] for i in complete]
    )
    scheduler = SchedulerLogs.scan(output_dir, submissions)
    pending = [
        classify_pending(VolumePaths(output_dir, i), scan, scheduler, log_lines)
        for i in expectation.indices
        if i not in complete_set
    ]
    mark_vanished_jobs(pending)
    debris_elsewhere = [
        classify_pending(VolumePaths(output_dir, i), scan, scheduler, log_lines)
        for i in sorted(set(scan.entries) | set(scan.names) | set(scan.log_names))
        if i not in complete_set and i not in expected_set
    ]
    debris_of_complete = [
        PendingVolume(i, "complete", debris=[str(p) for p in dead_debris(VolumePaths(output_dir, i), scan.listing(i))])
        for i in complete if scan.has_unexpected_names(i)
    ]
    pending_all = pending + [p for p in debris_elsewhere + debris_of_complete if p.debris]

    sizes = measure.result(n for roles in scan.entries.values() for n in roles.values()) if measure else {}
    for summary in summaries:
        if measure:
            found = scan.entries[summary.index]
            summary.array_bytes = {a: sizes.get(found[a], 0) for a in ARRAY_NAMES if a in found}
        else:
            summary.array_bytes = dict(summary.recorded_bytes)
    for entry in pending_all:
        entry.debris_bytes = sum(sizes[Path(d).name] if Path(d).name in sizes else bytes_on_disk(Path(d)) for d in entry.debris)

    by_state = {s: [p for p in pending if p.state == s] for s in ("running", "failed", "partial", "not_started")}
    report = Report(
        output_dir=str(output_dir.resolve()),
        generated=datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds"),
        expected={"count": len(expectation.indices), "ranges": format_ranges(expectation.indices), "source": expectation.source},
        counts={
            "expected": len(expectation.indices),
            "complete": len(complete_set & expected_set),
            "missing": len(pending),
            **{s: len(v) for s, v in by_state.items()},
            "complete_outside_expected": len(complete_set - expected_set),
        },
        complete=complete,
        missing=[p.index for p in pending],
        outside_expected=sorted(complete_set - expected_set),
        running=[asdict(p) for p in by_state["running"]],
        failed=[asdict(p) for p in by_state["failed"]],
        partial=[asdict(p) for p in pending_all if p.debris],
        not_started=[p.index for p in by_state["not_started"]],
        metadata_problems=metadata_problems,
        timing=timing_statistics(summaries),
        throughput=throughput(summaries, submissions, len(pending), bool(by_state["running"])),
        storage=storage_summary(output_dir, summaries, pending_all, len(expected_set | complete_set), measure, storage),
        sources=dict(Counter(s.source for s in summaries).most_common()),
        configuration=configuration_summary(summaries, configs),
        submissions=[submission_summary(r) for r in submissions],
        warnings=warnings,
    )
    return report


# ----------------------------------------------------------------------------- verdict


def finish_report(report: Report, checks: list[VolumeCheck] | None) -> Report:
    """Attach verification results and decide the exit status."""
    if checks is not None:
        report.verification = {
            "volumes": [asdict(c) for c in checks],
            "checked": len(checks),
            "failed": [c.index for c in checks if not c.ok],
        }
    report.exit_status, report.verdict = verdict(report, checks)
    return report


def verdict(report: Report, checks: list[VolumeCheck] | None) -> tuple[int, str]:
    """The exit status and its one-line reason: damage first, then gaps, then what was found."""
    verified = " and verified" if checks else ""
    if report.metadata_problems or any(not c.ok for c in checks or []):
        return EXIT_DAMAGED, "DAMAGED: verification or metadata problems found"
    if report.counts["missing"]:
        return EXIT_INCOMPLETE, f"INCOMPLETE: {report.counts['missing']} expected volume(s) not complete"
    sources = (report.source_check or {}).get("counts", {})
    if sources.get("stale"):
        return EXIT_STALE, f"STALE: the source of {sources['stale']} volume(s) changed; recompute them with --stale-only"
    if sources.get("unreachable"):
        return EXIT_UNREACHABLE, f"UNREACHABLE: the source of {sources['unreachable']} volume(s) cannot be read"
    if report.counts["expected"] == 0 and report.outside_expected:
        return EXIT_OK, f"OK: no volumes expected; {len(report.outside_expected)} complete volume(s) found{verified}"
    if report.counts["expected"] == 0:
        return EXIT_INCOMPLETE, "EMPTY: no volumes expected or found"
    checked = " and its source current" if report.source_check else ""
    return EXIT_OK, "OK: every expected volume is complete" + verified + checked
