"""Audit a feature cache: progress, failures, timing, storage, sources, configuration,
verification of the stored bytes, and preview images.

The report is built for directories of thousands of volumes while jobs still run: one
listing of the output directory and one of logs/, the small metadata JSON of each
complete volume, status records and log tails only for volumes that are not complete,
and one `du` (run concurrently) for the storage measure. Nothing here writes to the cache.

Verification opens every array of a volume and checks it against what the writer
recorded in the metadata (see dinov3_preprocessing.volume_metadata): shapes, dtypes,
chunk shape, the run's commit id in each array's attributes, that every chunk (zarr v2)
or shard (zarr v3) file exists, a crc32 of every chunk's decoded bytes, and NaN/Inf.
Heavy imports (numpy, TensorStore) happen only when verifying or previewing.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterable, Sequence

from dinov3_cache.errors import EXIT_DAMAGED, EXIT_FAILED, EXIT_OK, UsageError, first_line
from dinov3_cache.indices import format_ranges
from dinov3_cache.layout import (
    ARRAY_NAMES,
    VOLUME_ENTRY_RE,
    VolumePaths,
    bytes_on_disk,
    iter_files,
    metadata_is_intact,
    partial_debris,
    read_json,
    read_status,
    read_submission_records,
    scheduler_logs_dir,
    submissions_dir,
    volume_name,
)

EXIT_INCOMPLETE = EXIT_FAILED  # an expected volume is not complete

LOG_READ_BYTES = 64 * 1024  # kill messages and errors sit at the end of a job log
MAX_PROBLEMS_PER_ARRAY = 20
TIMING_ORDER = ("feature_extraction_seconds", "tensorstore_write_seconds", "total_seconds")
CONFIG_SHOWN = (
    "model_id", "pretrained", "base_resolution", "min_resolution_for_raw", "output_image_dim", "planes",
    "organelles", "features_dtype", "compression", "zarr_format", "chunks",
)


class AuditError(UsageError):
    """Bad input to the audit; one actionable line."""


# ----------------------------------------------------------------------------- index lists


@dataclass
class Expectation:
    indices: list[int]
    source: str  # where the expected set came from, in words


def expected_volumes(
    explicit: list[int] | None, submissions: list[dict], found: Iterable[int]
) -> Expectation:
    """The indices that should exist: given on the command line, else every recorded
    submission's, else 0 to the largest index seen on disk (gaps at the end unknown)."""
    if explicit is not None:
        return Expectation(sorted(set(explicit)), "given on the command line")
    submitted = sorted({int(i) for record in submissions for i in record.get("indices", [])})
    if submitted:
        return Expectation(submitted, f"from {len(submissions)} recorded submission(s)")
    seen = list(found)
    if not seen:
        return Expectation([], "nothing submitted or found")
    return Expectation(
        list(range(max(seen) + 1)),
        "inferred from the files (0 to the largest index; pass --num-volumes or --indices to count gaps at the end)",
    )


# ----------------------------------------------------------------------------- scanning the directory


@dataclass
class DirectoryScan:
    """Names found by one listing of OUT and one of OUT/logs, per volume index, keyed by
    role: 'metadata', 'staging', an array name, or 'status', 'log_out', 'log_err', 'lock'."""

    output_dir: Path
    entries: dict[int, dict[str, str]]
    log_entries: dict[int, dict[str, str]]

    def complete(self) -> list[int]:
        return sorted(i for i, roles in self.entries.items() if "metadata" in roles)

    def known_indices(self) -> set[int]:
        return set(self.entries) | set(self.log_entries)


def entry_roles() -> dict[str, str]:
    """Suffix after the volume name -> role, derived from VolumePaths (the one place
    that spells file names)."""
    paths = VolumePaths(Path("."), 0)
    named = {"metadata": paths.metadata, "staging": paths.staging, "status": paths.status,
             "log_out": paths.log_out, "log_err": paths.log_err, "lock": paths.lock}
    named.update({a: paths.array(a) for a in ARRAY_NAMES})
    return {path.name[len(paths.name):]: role for role, path in named.items()}


def group_by_volume(names: Iterable[str], roles: dict[str, str]) -> dict[int, dict[str, str]]:
    grouped: dict[int, dict[str, str]] = {}
    match_volume = VOLUME_ENTRY_RE.match
    for name in names:
        match = match_volume(name)
        role = roles.get(name[match.end():]) if match else None
        if role is not None:
            grouped.setdefault(int(match.group(1)), {})[role] = name
    return grouped


def scan_directory(output_dir: Path) -> DirectoryScan:
    logs = VolumePaths(output_dir, 0).logs
    try:
        log_names = os.listdir(logs)
    except FileNotFoundError:
        log_names = []
    except PermissionError as e:
        raise AuditError(f"cannot list {logs} ({e.strerror}); run the audit as a user who can read the cache") from None
    try:
        names = os.listdir(output_dir)
    except OSError as e:
        raise AuditError(f"cannot list --output-dir {output_dir} ({e.strerror}); run the audit as a user who can read it") from None
    roles = entry_roles()
    return DirectoryScan(output_dir, group_by_volume(names, roles), group_by_volume(log_names, roles))


# ----------------------------------------------------------------------------- storage


class StorageMeasure:
    """Bytes on disk of every top-level entry of OUT. Measured by one `du -k -d 1` run in
    the background while the metadata is read (the cost of one du); if du is missing or
    fails, by walking the files with cache_layout.bytes_on_disk."""

    def __init__(self, output_dir: Path):
        self.output_dir = output_dir
        self.method = "measured with du"
        self._out = tempfile.TemporaryFile()
        try:
            self._proc: subprocess.Popen | None = subprocess.Popen(
                ["du", "-k", "-d", "1", str(output_dir)], stdout=self._out, stderr=subprocess.DEVNULL
            )
        except OSError:
            self._proc = None

    def result(self, entry_names: Iterable[str]) -> dict[str, int]:
        sizes = self._du_sizes()
        if sizes is None:
            self.method = "measured by walking the files"
            sizes = {name: self._walk(self.output_dir / name) for name in entry_names}
        return sizes

    @staticmethod
    def _walk(path: Path) -> int:
        try:
            return bytes_on_disk(path)
        except NotADirectoryError:
            return 0  # a file (metadata): du -d 1 leaves files out as well

    def _du_sizes(self) -> dict[str, int] | None:
        if self._proc is None:
            return None
        self._proc.wait()
        self._out.seek(0)
        sizes = {}
        for line in self._out.read().decode(errors="replace").splitlines():
            kib, _, path = line.partition("\t")
            if kib.isdigit() and path:
                sizes[os.path.basename(path)] = int(kib) * 1024
        self._out.close()
        # du exits 1 when an entry vanished mid-walk (a job committing): its other lines stand
        return sizes or None


# ----------------------------------------------------------------------------- job logs


@dataclass(frozen=True)
class KillSignature:
    kind: str  # out_of_memory | walltime | gpu_out_of_memory | preempted | node_failure | cancelled
    scheduler: str
    pattern: re.Pattern
    advice: str


def _sig(kind: str, scheduler: str, pattern: str, advice: str) -> KillSignature:
    return KillSignature(kind, scheduler, re.compile(pattern), advice)


# What LSF (job report in the -o file), SLURM (slurmstepd / srun on stderr) and PyTorch
# print when a job is killed. Most specific first.
KILL_SIGNATURES = (
    _sig("out_of_memory", "LSF", r"TERM_MEMLIMIT", "raise --memory-gb"),
    _sig("walltime", "LSF", r"TERM_RUNLIMIT", "raise --walltime"),
    _sig("preempted", "LSF", r"TERM_PREEMPT", "resubmit with --missing-only"),
    _sig("cancelled", "LSF", r"TERM_OWNER|TERM_ADMIN", "resubmit with --missing-only"),
    _sig("out_of_memory", "SLURM", r"oom[-_]kill event|Exceeded job memory limit|task \d+: Out Of Memory", "raise --memory-gb"),
    _sig("walltime", "SLURM", r"CANCELLED AT \S+ DUE TO TIME LIMIT", "raise --walltime"),
    _sig("preempted", "SLURM", r"CANCELLED AT \S+ DUE TO PREEMPTION", "resubmit with --missing-only"),
    _sig("node_failure", "SLURM", r"DUE TO NODE FAILURE", "resubmit with --missing-only"),
    _sig("cancelled", "SLURM", r"CANCELLED AT \S+ \*\*\*", "resubmit with --missing-only"),
    _sig("gpu_out_of_memory", "CUDA", r"CUDA out of memory|OutOfMemoryError", "lower --batch-size or use a larger GPU"),
    _sig("out_of_memory", "Python", r"\bMemoryError\b", "raise --memory-gb"),
)


@dataclass
class KillReason:
    kind: str
    scheduler: str
    line: str
    advice: str


def recognise_kill(text: str) -> KillReason | None:
    for signature in KILL_SIGNATURES:
        for line in text.splitlines():
            if signature.pattern.search(line):
                return KillReason(signature.kind, signature.scheduler, line.strip()[:300], signature.advice)
    return None


def read_log_end(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - LOG_READ_BYTES))
            return f.read().decode(errors="replace")
    except FileNotFoundError:
        return ""


EXCEPTION_LINE_RE = re.compile(r"^\w+(\.\w+)*(Error|Exception|Interrupt)\b")


def last_error_line(text: str) -> str | None:
    """The CLI's last 'error: ...' line, else the last exception line of a traceback."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("error:"):
            return line[:300]
    for line in reversed(lines):
        if EXCEPTION_LINE_RE.match(line):
            return line[:300]
    return None


# ----------------------------------------------------------------------------- per-volume states


# Scheduler -o/-e files under logs/scheduler/ are named NAME_JOBID_ELEMENT.out|.err (LSF
# %J_%I, SLURM %A_%a; see job_schedulers); submission records map elements to volumes.
SCHEDULER_LOG_RE = re.compile(r"^.+_(?P<job>\d+)_(?P<element>\d+)\.(?:out|err)$")
STATUS_JOB_ID_RE = re.compile(r"^(?P<job>\d+)(?:\[(?P<lsf>\d+)\]|_(?P<slurm>\d+))$")


@dataclass
class SchedulerLogs:
    """The scheduler's own files per (job id, array element), and which (job, element)
    ran each volume, in submission order."""

    directory: Path
    files: dict[tuple[str, int], list[str]]
    attempts: dict[int, list[tuple[str, int]]]

    @classmethod
    def scan(cls, output_dir: Path, submissions: list[dict]) -> "SchedulerLogs":
        directory = scheduler_logs_dir(output_dir)
        try:
            names = sorted(os.listdir(directory))
        except (FileNotFoundError, NotADirectoryError):
            names = []
        files: dict[tuple[str, int], list[str]] = {}
        for name in names:
            match = SCHEDULER_LOG_RE.match(name)
            if match:
                files.setdefault((match.group("job"), int(match.group("element"))), []).append(name)
        attempts: dict[int, list[tuple[str, int]]] = {}
        for record in submissions:
            for array in record.get("arrays") or []:
                for element, index in enumerate(array.get("indices") or [], start=1):
                    attempts.setdefault(int(index), []).append((str(array.get("job_id")), element))
        return cls(directory, files, attempts)

    def current_attempt(self, index: int, status_job_id: str | None) -> tuple[str, int] | None:
        """The job element that ran the volume last: the one its status record names, else
        the latest submission's. Older attempts' kill notices are history, not the state."""
        match = STATUS_JOB_ID_RE.match(status_job_id or "")
        if match:
            return match.group("job"), int(match.group("lsf") or match.group("slurm"))
        return self.attempts[index][-1] if self.attempts.get(index) else None

    def paths_for(self, attempt: tuple[str, int] | None) -> list[Path]:
        return [self.directory / name for name in self.files.get(attempt, [])] if attempt else []


@dataclass
class LogInfo:
    paths: list[str]
    tail: list[str]
    error: str | None
    kill: KillReason | None


def inspect_logs(volume_logs: list[Path], scheduler_logs: list[Path], tail_lines: int, status: dict) -> LogInfo:
    """The volume's own logs (appended by every attempt) give the tail and the last error
    line; kills are read from the current attempt's scheduler files and the status error,
    and from the volume's logs only when no status record says which attempt is current."""
    own = {p: read_log_end(p) for p in volume_logs}
    scheduler = {p: read_log_end(p) for p in scheduler_logs}
    tail_source = next((t for t in own.values() if t.strip()), "") or next((t for t in scheduler.values() if t.strip()), "")
    tail = [line.rstrip() for line in tail_source.splitlines() if line.strip()][-tail_lines:] if tail_lines else []
    kill_text = "\n".join([*scheduler.values(), status.get("error") or ""] + ([] if status else list(own.values())))
    error = last_error_line("\n".join(own.values()))
    return LogInfo([str(p) for p in [*own, *scheduler]], tail, error, recognise_kill(kill_text))


def process_is_gone(status: dict) -> bool:
    """True only when the run's host is this one and its pid no longer exists."""
    if status.get("host") != socket.gethostname() or not status.get("pid"):
        return False
    try:
        os.kill(int(status["pid"]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError, OverflowError):
        return False
    return False


@dataclass
class PendingVolume:
    """An expected volume that is not complete."""

    index: int
    state: str  # running | failed | partial | not_started
    job_id: str | None = None
    host: str | None = None
    started: str | None = None
    error: str | None = None
    kill: KillReason | None = None
    logs: list[str] = field(default_factory=list)
    log_tail: list[str] = field(default_factory=list)
    debris: list[str] = field(default_factory=list)
    debris_bytes: int = 0


def classify_pending(
    paths: VolumePaths, scan: DirectoryScan, scheduler: SchedulerLogs, tail_lines: int
) -> PendingVolume:
    index = paths.volume_index
    logged = scan.log_entries.get(index, {})
    status = (read_status(paths) if "status" in logged else None) or {}
    volume_logs = [p for role, p in (("log_err", paths.log_err), ("log_out", paths.log_out)) if role in logged]
    scheduler_logs = scheduler.paths_for(scheduler.current_attempt(index, status.get("job_id")))
    has_logs = bool(volume_logs or scheduler_logs)
    logs = inspect_logs(volume_logs, scheduler_logs, tail_lines, status) if has_logs or status.get("error") else LogInfo([], [], None, None)
    entry = PendingVolume(
        index, "not_started", job_id=status.get("job_id"), host=status.get("host"), started=status.get("started"),
        kill=logs.kill, logs=logs.paths,
    )
    state = status.get("state")
    if logs.kill is not None or state == "failed":
        entry.state = "failed"
        entry.error = status.get("error") or logs.error or (logs.kill.line if logs.kill else None)
    elif state == "running" and process_is_gone(status):
        entry.state, entry.error = "failed", f"process {status.get('pid')} on {status.get('host')} is gone (killed?)"
    elif state == "running":
        entry.state = "running"
    elif has_logs and logs.error:
        entry.state, entry.error = "failed", logs.error
    elif has_logs:
        entry.state = "running"  # a job that has not written its status record yet
    if entry.state == "failed":
        entry.log_tail = logs.tail
    if entry.state != "running" and scan.entries.get(index):
        entry.debris = [str(p) for p in partial_debris(paths)]
        if entry.debris and entry.state == "not_started":
            entry.state = "partial"
    return entry


# ----------------------------------------------------------------------------- complete volumes


@dataclass
class VolumeSummary:
    index: int
    timestamp: str | None
    timing: dict[str, float]
    source: str
    fingerprint: str | None
    recorded_bytes: dict[str, int]
    array_bytes: dict[str, int] = field(default_factory=dict)


def source_label(source: dict) -> str:
    for key in ("dataset", "name"):
        if source.get(key):
            return str(source[key])
    raw = (source.get("paths") or {}).get("raw")
    return str(raw) if raw else "unknown"


def summarise_volume(index: int, metadata: dict) -> VolumeSummary:
    storage = metadata.get("storage") or {}
    return VolumeSummary(
        index=index,
        timestamp=metadata.get("timestamp"),
        timing={k: float(v) for k, v in (metadata.get("timing") or {}).items() if isinstance(v, (int, float))},
        source=source_label(metadata.get("source_dataset") or {}),
        fingerprint=(metadata.get("configuration") or {}).get("fingerprint"),
        recorded_bytes={k: int(v) for k, v in (storage.get("bytes") or {}).items()},
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


# ----------------------------------------------------------------------------- the report


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
    debris_elsewhere = [
        classify_pending(VolumePaths(output_dir, i), scan, scheduler, log_lines)
        for i in sorted(scan.entries)
        if i not in complete_set and i not in expected_set
    ]
    pending_all = pending + [p for p in debris_elsewhere if p.debris]

    sizes = measure.result(n for roles in scan.entries.values() for n in roles.values()) if measure else {}
    for summary in summaries:
        if measure:
            found = scan.entries[summary.index]
            summary.array_bytes = {a: sizes.get(found[a], 0) for a in ARRAY_NAMES if a in found}
        else:
            summary.array_bytes = dict(summary.recorded_bytes)
    for entry in pending_all:
        entry.debris_bytes = sum(sizes.get(Path(d).name, 0) for d in entry.debris)

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


def read_complete_volumes(
    output_dir: Path, indices: list[int], names: list[str] | None = None
) -> tuple[list[VolumeSummary], list[dict], dict]:
    """Summaries of every complete volume (one small JSON each), the unreadable ones, and
    one configuration per fingerprint. `names`: the metadata file names, as listed."""
    summaries, problems, configs = [], [], {}
    names = names or [VolumePaths(output_dir, i).metadata.name for i in indices]
    directory = str(output_dir)
    for index, name in zip(indices, names):
        path = os.path.join(directory, name)
        try:
            with open(path, "rb") as f:
                metadata = json.loads(f.read())
        except FileNotFoundError:
            continue  # replaced by an --overwrite run between listing and reading
        except (OSError, ValueError) as e:
            problems.append({"index": index, "problem": f"metadata file {name} is unreadable ({e})"})
            continue
        summary = summarise_volume(index, metadata)
        summaries.append(summary)
        configs.setdefault(summary.fingerprint, metadata.get("configuration") or {})
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
    }


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


# ----------------------------------------------------------------------------- verification


@dataclass
class VolumeCheck:
    index: int
    ok: bool
    problems: list[str]
    arrays: dict[str, dict] = field(default_factory=dict)
    seconds: float = 0.0


def choose_volumes_to_verify(
    complete: list[int], sample_size: int | None, indices: list[int] | None, verify_all: bool, seed: int | None
) -> list[int]:
    chosen: set[int] = set(indices or [])
    if verify_all:
        chosen |= set(complete)
    elif sample_size:
        chosen |= set(random.Random(seed).sample(complete, min(sample_size, len(complete))))
    return sorted(chosen)


def verify_volume(output_dir: Path, index: int, num_threads: int = 8) -> VolumeCheck:
    """Check one volume's arrays against its metadata. Each problem names the volume,
    the array and, where it applies, the chunk and the file."""
    from dinov3_cache.zarr_arrays import ts_context

    started = time.perf_counter()
    paths = VolumePaths(Path(output_dir), index)
    if not paths.metadata.is_file():
        return VolumeCheck(index, False, [f"{paths.name}: not complete (no {paths.metadata.name}); nothing to verify"])
    try:
        metadata = read_json(paths.metadata)
    except (OSError, ValueError) as e:
        return VolumeCheck(index, False, [f"{paths.name}: metadata file {paths.metadata} is unreadable ({e})"])
    problems = []
    if not metadata_is_intact(metadata):
        problems.append(f"{paths.name}: metadata file {paths.metadata} was edited after it was written (digest mismatch)")
    integrity = metadata.get("integrity") or {}
    if not integrity.get("crc32"):
        problems.append(f"{paths.name}: metadata records no chunk checksums (written by an older version?)")
    context = ts_context(num_threads)
    arrays = {}
    for name in metadata.get("dtypes") or {}:
        array_problems, arrays[name] = verify_array(paths, name, metadata, context)
        problems += array_problems
    if not metadata.get("dtypes"):
        problems.append(f"{paths.name}: metadata lists no arrays (no 'dtypes')")
    return VolumeCheck(index, not problems, problems, arrays, round(time.perf_counter() - started, 3))


@dataclass
class StoredLayout:
    """How an array's chunks map to files: zarr v2 one file per chunk, v3 one per shard."""

    unit: tuple[int, ...]  # region covered by one file
    key_prefix: str
    separator: str
    uncompressed_nbytes: int | None  # exact file size where it is known (v2 without compressor)

    def file_key(self, unit_index: Sequence[int]) -> str:
        return self.key_prefix + self.separator.join(map(str, unit_index))


def stored_layout(path: Path, itemsize: int) -> StoredLayout:
    from dinov3_cache.zarr_arrays import zarr_format_of

    if zarr_format_of(path) == 2:
        meta = json.loads((path / ".zarray").read_text())
        size = math.prod(meta["chunks"]) * itemsize if meta.get("compressor") is None and not meta.get("filters") else None
        return StoredLayout(tuple(meta["chunks"]), "", meta.get("dimension_separator", "."), size)
    meta = json.loads((path / "zarr.json").read_text())
    encoding = meta.get("chunk_key_encoding") or {"name": "default"}
    default = encoding.get("name") == "default"
    separator = (encoding.get("configuration") or {}).get("separator", "/" if default else ".")
    prefix = "c" + separator if default else ""
    return StoredLayout(tuple(meta["chunk_grid"]["configuration"]["chunk_shape"]), prefix, separator, None)


def present_files(path: Path, layout: StoredLayout) -> dict[str, int]:
    """Relative path -> size of every file that could hold chunks (one listing, or a walk
    of c/ for v3)."""
    files = {}
    for entry in iter_files(path):
        rel = os.path.relpath(entry.path, path).replace(os.sep, "/")
        if not rel.startswith((".z", "zarr.json")):
            try:
                files[rel] = entry.stat(follow_symlinks=False).st_size
            except FileNotFoundError:
                pass
    return files


def _chunk_problems_limit(problems: list[str], where: str) -> list[str]:
    if len(problems) <= MAX_PROBLEMS_PER_ARRAY:
        return problems
    return problems[:MAX_PROBLEMS_PER_ARRAY] + [f"{where}: ... and {len(problems) - MAX_PROBLEMS_PER_ARRAY} more chunk problems"]


def verify_array(paths: VolumePaths, name: str, metadata: dict, context) -> tuple[list[str], dict]:
    from dinov3_cache.zarr_arrays import chunk_slices, open_array, read_attributes, storage_chunks

    path = paths.array(name)
    where = f"{paths.name} {name}"
    info: dict[str, Any] = {"path": str(path)}
    if not path.is_dir():
        return [f"{where}: array {path} is missing"], info
    problems = []
    integrity = metadata.get("integrity") or {}
    try:
        attributes = read_attributes(path)
    except (OSError, ValueError) as e:
        problems.append(f"{where}: attributes of {path} are unreadable ({e})")
        attributes = {}
    problems += attribute_problems(where, name, attributes, metadata)
    try:
        store = open_array(path, context)
    except Exception as e:  # TensorStore raises ValueError / RuntimeError with the reason
        return problems + [f"{where}: cannot open {path} ({first_line(e)})"], info
    shape, dtype = list(store.shape), str(store.dtype.numpy_dtype)
    info.update(shape=shape, dtype=dtype)
    chunks = storage_chunks(path)
    layout_problems = []
    if shape != list((metadata.get("shapes") or {}).get(name, [])):
        layout_problems.append(f"{where}: shape {shape} differs from the metadata's {metadata.get('shapes', {}).get(name)}")
    if dtype != (metadata.get("dtypes") or {}).get(name):
        layout_problems.append(f"{where}: dtype {dtype} differs from the metadata's {metadata['dtypes'].get(name)}")
    recorded_chunks = (integrity.get("chunks") or {}).get(name)
    if recorded_chunks is not None and list(chunks) != list(recorded_chunks):
        layout_problems.append(f"{where}: chunk shape {list(chunks)} differs from the metadata's {recorded_chunks}")
    if layout_problems:  # the recorded checksums describe another layout: comparing them says nothing more
        return problems + layout_problems, info

    layout = stored_layout(path, store.dtype.numpy_dtype.itemsize)
    files = present_files(path, layout)
    missing_files, file_problems = set(), []
    for unit_index, _ in chunk_slices(shape, layout.unit):
        key = layout.file_key(unit_index)
        if key not in files:
            missing_files.add(key)
            file_problems.append(f"{where}: chunk file {path / key} is missing (zarr would silently read zeros)")
        elif layout.uncompressed_nbytes is not None and files[key] != layout.uncompressed_nbytes:
            file_problems.append(
                f"{where}: chunk file {path / key} has {files[key]} bytes, expected {layout.uncompressed_nbytes} (truncated?)"
            )
    problems += _chunk_problems_limit(file_problems, where)

    recorded = (integrity.get("crc32") or {}).get(name) or {}
    data_problems, stats = check_chunk_data(store, shape, chunks, layout, missing_files, recorded, where, path)
    problems += _chunk_problems_limit(data_problems, where)
    info.update(stats, chunk_files=len(files), chunks=list(chunks))
    return problems, info


def attribute_problems(where: str, name: str, attributes: dict, metadata: dict) -> list[str]:
    """The array must come from the run that wrote the metadata, and sit where it says."""
    problems = []
    commit = (attributes.get("dinov3_cache") or {}).get("commit_id")
    expected = (metadata.get("integrity") or {}).get("commit_id")
    if commit != expected:
        problems.append(f"{where}: array was written by another run (commit id {commit}, metadata says {expected})")
    configuration = metadata.get("configuration") or {}
    voxel = (configuration.get("voxel_size_nm") or {}).get("raw" if name == "raw" else "features")
    if voxel is not None and attributes.get("voxel_size") not in (None, voxel):
        problems.append(f"{where}: voxel_size attribute {attributes.get('voxel_size')} differs from the metadata's {voxel}")
    offset = configuration.get("offset_nm")
    if offset is not None and attributes.get("offset") not in (None, offset):
        problems.append(f"{where}: offset attribute {attributes.get('offset')} differs from the metadata's {offset}")
    return problems


def check_chunk_data(store, shape, chunks, layout: StoredLayout, missing_files, recorded, where, path):
    """Read slabs (chunk-sized along leading axes, whole along the last two), compare each
    chunk's crc32 with the recorded one and count NaN/Inf. Where a slab cannot be read,
    read its chunks one by one to name the damaged ones."""
    import numpy as np

    from dinov3_cache.zarr_arrays import chunk_key, chunk_slices, crc32_of

    problems: list[str] = []
    floating = store.dtype.numpy_dtype.kind == "f" or str(store.dtype.numpy_dtype) == "bfloat16"
    stats = {"chunks_checked": 0, "chunks_without_checksum": 0, "non_finite": 0}
    lead = len(shape) - 2
    slab_chunks = tuple(chunks[:lead]) + tuple(shape[lead:])

    def chunk_file(grid_index) -> str:
        return layout.file_key(tuple(g * c // u for g, c, u in zip(grid_index, chunks, layout.unit)))

    def check(grid_index, block) -> None:
        key = chunk_key(grid_index)
        if floating:
            bad = int(np.count_nonzero(~np.isfinite(block)))
            if bad:
                stats["non_finite"] += bad
                problems.append(f"{where}: chunk {key} holds {bad} NaN/Inf values")
        if chunk_file(grid_index) in missing_files:
            return
        if key not in recorded:
            stats["chunks_without_checksum"] += 1
            problems.append(f"{where}: chunk {key} has no recorded checksum")
            return
        found = crc32_of(block)
        stats["chunks_checked"] += 1
        if found != int(recorded[key]):
            problems.append(
                f"{where}: chunk {key} crc32 {found} differs from the recorded {recorded[key]} "
                f"(file {path / chunk_file(grid_index)})"
            )

    for slab_index, slab_region in chunk_slices(shape, slab_chunks):
        try:
            slab = store[slab_region].read().result()
        except Exception:
            slab = None
        for local_index, local in chunk_slices([s.stop - s.start for s in slab_region], chunks):
            grid_index = tuple(si * (sc // c) + li for si, sc, c, li in zip(slab_index, slab_chunks, chunks, local_index))
            if slab is not None:
                check(grid_index, slab[local])
                continue
            region = tuple(slice(r.start + l.start, r.start + l.stop) for r, l in zip(slab_region, local))
            try:
                check(grid_index, store[region].read().result())
            except Exception as e:
                problems.append(
                    f"{where}: chunk {chunk_key(grid_index)} cannot be read ({first_line(e)}) "
                    f"(file {path / chunk_file(grid_index)})"
                )
    return problems, stats


# ----------------------------------------------------------------------------- preview


PREVIEW_PANEL_PIXELS = 256


def preview_path(preview_dir: Path, index: int) -> Path:
    return Path(preview_dir) / f"{volume_name(index)}_preview.png"


def pca_rgb(features) -> "np.ndarray":
    """(C, H, W) -> (H, W, 3) uint8: the three main components over channels, each
    stretched between its 1st and 99th percentile."""
    import numpy as np

    c, h, w = features.shape
    x = features.reshape(c, h * w).T.astype(np.float64)
    x -= x.mean(axis=0)
    _, vectors = np.linalg.eigh(x.T @ x)
    components = x @ vectors[:, ::-1][:, : min(3, c)]
    if components.shape[1] < 3:
        components = np.pad(components, ((0, 0), (0, 3 - components.shape[1])))
    lo, hi = np.percentile(components, 1, axis=0), np.percentile(components, 99, axis=0)
    scaled = (components - lo) / np.where(hi > lo, hi - lo, 1)
    return (np.clip(scaled, 0, 1) * 255).astype(np.uint8).reshape(h, w, 3)


def label_rgb(labels) -> "np.ndarray":
    """Each label id a fixed bright colour (hashed), background 0 black."""
    import numpy as np

    ids = labels.astype(np.uint64)
    mask32 = np.uint64(0xFFFFFFFF)
    h = (ids * np.uint64(0x9E3779B1)) & mask32  # murmur3-style mixing: neighbouring ids get unrelated colours
    h = ((h ^ (h >> np.uint64(15))) * np.uint64(0x85EBCA77)) & mask32
    h ^= h >> np.uint64(13)
    rgb = np.stack([(h >> np.uint64(s)) & np.uint64(255) for s in (16, 8, 0)], axis=-1)
    rgb = (64 + rgb * 3 // 4).astype(np.uint8)
    rgb[ids == 0] = 0
    return rgb


def grey_rgb(values, lo: float, hi: float) -> "np.ndarray":
    import numpy as np

    scaled = (values.astype(np.float64) - lo) / (hi - lo if hi > lo else 1)
    grey = (np.clip(scaled, 0, 1) * 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)


def write_preview(output_dir: Path, index: int, preview_dir: Path, num_threads: int = 8) -> Path:
    """Middle z slice of the features (PCA as RGB), gt, mask and raw, side by side."""
    from dinov3_cache.audit.png import compose, write_png
    from dinov3_cache.zarr_arrays import open_array, ts_context

    paths = VolumePaths(Path(output_dir), index)
    metadata = read_json(paths.metadata)
    context = ts_context(num_threads)
    features = open_array(paths.array("features"), context)
    depth = features.shape[1]
    z = depth // 2
    panels = [("features PCA", pca_rgb(features[:, z].read().result().astype("float32")))]
    if paths.array("gt").is_dir():
        panels.append(("gt", label_rgb(open_array(paths.array("gt"), context)[z].read().result())))
    if paths.array("mask").is_dir():
        panels.append(("mask", grey_rgb(open_array(paths.array("mask"), context)[z].read().result(), 0, 1)))
    if paths.array("raw").is_dir():
        raw = open_array(paths.array("raw"), context)
        factor = max(1, raw.shape[0] // depth)
        lo, hi = (metadata.get("configuration") or {}).get("intensity_range", [0, 255])
        # the raw slices that area-average into label slice z
        panels.append(("raw", grey_rgb(raw[z * factor : (z + 1) * factor].read().result().mean(axis=0), lo, hi)))
    source = source_label(metadata.get("source_dataset") or {})
    header = f"{paths.name}  z {z}/{depth}  {source}"
    return write_png(preview_path(preview_dir, index), compose(panels, header, PREVIEW_PANEL_PIXELS))


# ----------------------------------------------------------------------------- verdict


def finish_report(report: Report, checks: list[VolumeCheck] | None) -> Report:
    """Attach verification results and decide the exit status."""
    if checks is not None:
        report.verification = {
            "volumes": [asdict(c) for c in checks],
            "checked": len(checks),
            "failed": [c.index for c in checks if not c.ok],
        }
    damaged = bool(report.metadata_problems) or bool(checks and any(not c.ok for c in checks))
    incomplete = report.counts["missing"] > 0
    if damaged:
        report.exit_status, report.verdict = EXIT_DAMAGED, "DAMAGED: verification or metadata problems found"
    elif incomplete:
        report.exit_status, report.verdict = EXIT_INCOMPLETE, f"INCOMPLETE: {report.counts['missing']} expected volume(s) not complete"
    elif report.counts["expected"] == 0:
        report.exit_status, report.verdict = EXIT_INCOMPLETE, "EMPTY: no volumes expected or found"
    else:
        report.exit_status = EXIT_OK
        report.verdict = "OK: every expected volume is complete" + (" and verified" if checks else "")
    return report


# ----------------------------------------------------------------------------- text


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} PB"


def _index_list(indices: list[int], limit: int = 400) -> str:
    text = format_ranges(indices)
    return text if len(text) <= limit else text[:limit].rsplit(",", 1)[0] + ", ..."


def format_report(report: Report) -> str:
    out: list[str] = []
    add = out.append
    c = report.counts
    add(f"Cache {report.output_dir}  (report of {report.generated})")
    add(f"Expected {c['expected']} volume(s): {report.expected['ranges'] or '-'}  ({report.expected['source']})")
    for warning in report.warnings:
        add(f"WARNING: {warning}")
    add("")
    add("Volumes")
    add(f"  complete      {c['complete']:>6} / {c['expected']}")
    add(f"  missing       {c['missing']:>6}" + (f"   {_index_list(report.missing)}" if report.missing else ""))
    for state, label in (("running", "running"), ("failed", "failed"), ("partial", "partial"), ("not_started", "not started")):
        indices = report.not_started if state == "not_started" else [p["index"] for p in getattr(report, state) if p["state"] == state]
        if indices:
            add(f"    {label:<11} {len(indices):>6}   {_index_list(indices)}")
    if report.outside_expected:
        add(f"  also complete outside the expected set: {len(report.outside_expected)}   {_index_list(report.outside_expected)}")
    for p in report.running[:50]:
        add(f"    running {p['index']}: job {p['job_id'] or '-'} on {p['host'] or '?'} since {p['started'] or '?'}")
    if report.partial:
        add(f"  partial debris of killed runs ({human_bytes(report.storage['debris_bytes'])}; removed by the next run of the volume):")
        for p in report.partial[:50]:
            add(f"    {p['index']}: " + ", ".join(Path(d).name for d in p["debris"]))
    format_failures(report, add)
    format_metadata_problems(report, add)
    format_timing(report, add)
    format_storage(report, add)
    format_sources_and_configuration(report, add)
    format_submissions(report, add)
    format_verification(report, add)
    add("")
    add(f"Result: {report.verdict} (exit status {report.exit_status})")
    return "\n".join(out)


def format_failures(report: Report, add) -> None:
    if not report.failed:
        return
    add("")
    add(f"Failures ({len(report.failed)})")
    for p in report.failed[:100]:
        job = f" [job {p['job_id']}{' on ' + p['host'] if p['host'] else ''}]" if p["job_id"] or p["host"] else ""
        kill = p.get("kill")
        if kill:
            add(f"  volume {p['index']}{job}: killed: {kill['kind'].replace('_', ' ')} ({kill['scheduler']}): {kill['line']}")
            add(f"      -> {kill['advice']}")
            if p["error"] and p["error"] != kill["line"]:
                add(f"      last error: {p['error']}")
        else:
            add(f"  volume {p['index']}{job}: {p['error'] or 'failed (no error recorded)'}")
        if p["logs"]:
            add(f"      log {', '.join(p['logs'])}" + (f" (last {len(p['log_tail'])} lines):" if p["log_tail"] else ""))
            for line in p["log_tail"]:
                add(f"        | {line[:200]}")
    if len(report.failed) > 100:
        add(f"  ... and {len(report.failed) - 100} more (see --json)")


def format_metadata_problems(report: Report, add) -> None:
    if report.metadata_problems:
        add("")
        add("Metadata problems")
        for p in report.metadata_problems:
            add(f"  volume {p['index']}: {p['problem']}")


def format_timing(report: Report, add) -> None:
    add("")
    if not report.timing:
        add("Timing: no complete volumes")
        return
    n = max(v["count"] for v in report.timing.values())
    add(f"Timing per volume, seconds ({n} complete)      mean   median      min      max")
    for key, v in report.timing.items():
        label = key.removesuffix("_seconds").replace("_", " ")
        add(f"  {label:<38} {v['mean']:>8.2f} {v['median']:>8.2f} {v['min']:>8.2f} {v['max']:>8.2f}")
    t = report.throughput
    if t["volumes_per_hour"]:
        line = f"  throughput {t['volumes_per_hour']:.1f} volumes/hour since {t['since']}"
        if t["estimated_finish"]:
            line += f"; {t['remaining']} left, estimated finish {t['estimated_finish']}"
        add(line)


def format_storage(report: Report, add) -> None:
    s = report.storage
    add("")
    add(f"Storage ({s['method']})")
    add(f"  total {human_bytes(s['total_bytes'])} in {s['volumes']} complete volume(s); per volume {human_bytes(s['per_volume_mean_bytes'])}")
    for name, total in s["by_array_bytes"].items():
        add(f"    {name:<10} {human_bytes(s['by_array_mean_bytes'][name]):>12} per volume   {human_bytes(total):>12} total")
    if s["debris_bytes"]:
        add(f"  debris of killed runs {human_bytes(s['debris_bytes'])}")
    if s["projected_total_bytes"] is not None:
        add(
            f"  projected for {s['projected_count']} volumes: {human_bytes(s['projected_total_bytes'])}; "
            f"still needed {human_bytes(s['still_needed_bytes'])}; free on this file system {human_bytes(s['free_bytes'])}"
        )
    if s["short_of_space"]:
        add(f"  WARNING: not enough free space: {human_bytes(s['still_needed_bytes'])} needed, {human_bytes(s['free_bytes'])} free")


def format_sources_and_configuration(report: Report, add) -> None:
    if report.sources:
        add("")
        add("Sources (volumes per dataset)")
        for name, n in report.sources.items():
            add(f"  {n:>6}  {name}")
    cfg = report.configuration
    if cfg["fingerprint"] is None:
        return
    add("")
    add(f"Configuration (fingerprint {cfg['fingerprint']}, shared by {cfg['volumes']} volume(s))")
    for key in CONFIG_SHOWN:
        if key in cfg["settings"]:
            add(f"  {key:<24} {cfg['settings'][key]}")
    for group in cfg["differing"]:
        diffs = "; ".join(f"{k}: {v['these']} (majority {v['majority']})" for k, v in list(group["differences"].items())[:6])
        add(
            f"  WARNING: {len(group['indices'])} volume(s) have a different configuration (fingerprint {group['fingerprint']}): "
            f"{_index_list(group['indices'])}" + (f" -- {diffs}" if diffs else "")
        )


def format_submissions(report: Report, add) -> None:
    if not report.submissions:
        return
    add("")
    add(f"Submissions ({len(report.submissions)})")
    for s in report.submissions[-10:]:
        jobs = s["job_ids"]
        jobs_text = ", ".join(map(str, jobs))[:120] if isinstance(jobs, list) else str(jobs)[:120]
        add(f"  {s['submitted']}  {s['scheduler']}  {s['volumes']} volume(s) {s['indices']}  jobs {jobs_text or '-'}")


def format_verification(report: Report, add) -> None:
    v = report.verification
    if v is None:
        return
    add("")
    add(f"Verification ({v['checked']} volume(s), {len(v['failed'])} failed)")
    for check in v["volumes"]:
        if check["ok"]:
            arrays = ", ".join(
                f"{name} {a.get('chunks_checked', 0)} chunks" for name, a in check["arrays"].items()
            )
            add(f"  volume {check['index']}: OK ({arrays}; crc32, files, shapes, NaN/Inf checked in {check['seconds']:.1f} s)")
        else:
            add(f"  volume {check['index']}: FAILED")
            for problem in check["problems"]:
                add(f"    {problem}")
    for preview in report.previews:
        add(f"  preview {preview['index']}: {preview.get('path') or preview.get('skipped')}")
