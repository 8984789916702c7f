"""Cache names that have not moved to their own module yet: the scheduler environment and the
submission records. File names are paths.py, JSON and
status records records.py, locks locks.py, the commit and its debris commit_protocol.py."""

from __future__ import annotations

import os
import re
import time
import uuid
from pathlib import Path

from dinov3_cache.paths import LOGS_DIR
from dinov3_cache.records import read_json, write_json_atomic


def scheduler_job_id() -> str | None:
    """The job id as LSF or SLURM exposes it, with the array element where there is one."""
    env = os.environ
    if env.get("LSB_JOBID"):
        index = env.get("LSB_JOBINDEX", "0")
        return env["LSB_JOBID"] + (f"[{index}]" if index not in ("", "0") else "")
    if env.get("SLURM_ARRAY_JOB_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env.get('SLURM_ARRAY_TASK_ID', '')}"
    return env.get("SLURM_JOB_ID")


# ----------------------------------------------------------------------------- submissions


SUBMISSIONS_DIR = "submissions"  # under logs/: one JSON record per submission


def submissions_dir(output_dir: Path | str) -> Path:
    return Path(output_dir) / LOGS_DIR / SUBMISSIONS_DIR


def submission_stamp() -> str:
    """A name part unique to one submission: its record and its settings file share it."""
    return time.strftime("%Y%m%dT%H%M%S") + f"_{os.getpid()}_{uuid.uuid4().hex[:6]}"


def settings_file_path(output_dir: Path | str, stamp: str) -> Path:
    """The extraction settings a submission writes once and every one of its jobs reads."""
    return submissions_dir(output_dir) / f"settings_{stamp}.json"


def write_submission_record(output_dir: Path | str, record: dict, stamp: str | None = None) -> Path:
    """Record one submission: {"submitted", "indices", "scheduler", "job_ids", "options", "command", ...}."""
    path = submissions_dir(output_dir) / f"submission_{stamp or submission_stamp()}.json"
    write_json_atomic(path, record)
    return path


SCHEDULER_LOGS_DIR = "scheduler"  # under logs/: LSF/SLURM -o/-e files, where kill notices land


def scheduler_logs_dir(output_dir: Path | str) -> Path:
    return Path(output_dir) / LOGS_DIR / SCHEDULER_LOGS_DIR


def scheduler_log_name(job_name: str, job_id: str, element: str, stream: str) -> str:
    """NAME_JOBID_ELEMENT.out|.err under logs/scheduler/; the scheduler fills in the ids
    from its patterns (LSF %J and %I, SLURM %A and %a)."""
    return f"{job_name}_{job_id}_{element}.{stream}"


SCHEDULER_LOG_RE = re.compile(r"^.+_(?P<job>\d+)_(?P<element>\d+)\.(?:out|err)$")  # scheduler_log_name's files
# scheduler_job_id() of an array element: LSF JOB[ELEMENT], SLURM JOB_ELEMENT
JOB_ELEMENT_RE = re.compile(r"^(?P<job>\d+)(?:\[(?P<lsf>\d+)\]|_(?P<slurm>\d+))$")


def job_element(job_id: str | None) -> tuple[str, int] | None:
    """(job id, array element) of a recorded scheduler_job_id(), or None for a plain job."""
    match = JOB_ELEMENT_RE.match(job_id or "")
    return (match.group("job"), int(match.group("lsf") or match.group("slurm"))) if match else None


def read_submission_records(output_dir: Path | str) -> list[dict]:
    """Every recorded submission, oldest first."""
    directory = submissions_dir(output_dir)
    if not directory.is_dir():
        return []
    return [read_json(p) for p in sorted(directory.glob("submission_*.json"))]
