"""Why a volume is not complete: job logs (the volume's own and the scheduler's files), kill
notices (each scheduler's, as its backend in cluster/ defines them, then CUDA's and Python's),
and the state each pending volume is in (running, failed, partial or not started)."""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path

from dinov3_cache.audit.scan import DirectoryScan
from dinov3_cache.cluster.base import SCHEDULER_LOG_RE, kill_signature, scheduler_logs_dir
from dinov3_cache.cluster.schedulers import job_element, scheduler_kill_signatures
from dinov3_cache.commit_protocol import dead_debris
from dinov3_cache.paths import VolumePaths
from dinov3_cache.records import read_status

LOG_READ_BYTES = 64 * 1024  # kill messages and errors sit at the end of a job log

# How a kill shows: each scheduler's own notices (its backend in cluster/ knows them), then
# what PyTorch and Python print. Most specific first.
KILL_SIGNATURES = (
    *scheduler_kill_signatures(),
    kill_signature("gpu_out_of_memory", "CUDA", r"CUDA out of memory|OutOfMemoryError", "lower --batch-size or use a larger GPU"),
    kill_signature("out_of_memory", "Python", r"\bMemoryError\b", "raise --memory-gb"),
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


@dataclass
class SchedulerLogs:
    """The scheduler's own files per (job id, array element), and which (job, element)
    ran each volume, in submission order."""

    directory: Path
    files: dict[tuple[str, int], list[str]]
    attempts: dict[int, list[tuple[str, int]]]

    @classmethod
    def scan(cls, output_dir: Path, submissions: list[dict]) -> SchedulerLogs:
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
        recorded = job_element(status_job_id)
        if recorded:
            return recorded
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
    if entry.state != "running" and any(scan.listing(index)):  # commit directories and temporary files too
        entry.debris = [str(p) for p in dead_debris(paths, scan.listing(paths.volume_index))]
        if entry.debris and entry.state == "not_started":
            entry.state = "partial"
    return entry

