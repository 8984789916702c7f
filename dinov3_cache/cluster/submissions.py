"""What a submission records under OUT/logs/submissions/: one record and one settings file
each, sharing a stamp unique to the submission."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

from dinov3_cache.paths import LOGS_DIR
from dinov3_cache.records import read_json, write_json_atomic

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


def read_submission_records(output_dir: Path | str) -> list[dict]:
    """Every recorded submission, oldest first."""
    directory = submissions_dir(output_dir)
    if not directory.is_dir():
        return []
    return [read_json(p) for p in sorted(directory.glob("submission_*.json"))]
