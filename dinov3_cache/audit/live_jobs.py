"""Which recorded scheduler jobs still exist: a job whose host died leaves no message and
its status record says 'running' forever. One squeue or bjobs call answers for every
recorded job id (short timeout); a volume whose job is gone is reported failed."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable, Iterable

from dinov3_cache.layout import job_element

QUERY_TIMEOUT_SECONDS = 10
LSF_FINISHED = {"DONE", "EXIT"}
SLURM_ID_RE = re.compile(r"^(?P<job>\d+)(?:_(?:(?P<one>\d+)|\[(?P<ranges>[^\]]+)\]))?$")

# (scheduler name, the ids still alive) or None when no scheduler could answer
Query = Callable[[list[str]], "tuple[str, set[str]] | None"]


def base_job_ids(job_ids: Iterable[str]) -> list[str]:
    """The array (or plain) job ids to ask about: '12_3' and '12[3]' ask about 12."""
    return sorted({element[0] if (element := job_element(j)) else j for j in job_ids}, key=lambda j: (len(j), j))


def parse_squeue(output: str) -> set[str]:
    """`squeue -h -o %i` lines: '12', '12_3', or a pending range '12_[4-9%2]' (expanded)."""
    alive: set[str] = set()
    for line in output.split():
        match = SLURM_ID_RE.match(line.strip())
        if not match:
            continue
        job = match.group("job")
        if match.group("one"):
            alive.add(f"{job}_{match.group('one')}")
        elif match.group("ranges"):
            for part in match.group("ranges").split("%")[0].split(","):
                first, _, last = part.partition("-")
                if first.isdigit() and (last or first).isdigit():
                    alive.update(f"{job}_{i}" for i in range(int(first), int(last or first) + 1))
        else:
            alive.add(job)
    return alive


def parse_bjobs(output: str) -> set[str]:
    """`bjobs -noheader -o 'jobid jobindex stat'` lines: '12 3 RUN' ('0': not an array);
    finished jobs (DONE, EXIT) that LSF still lists are gone."""
    alive: set[str] = set()
    for line in output.splitlines():
        fields = line.split()
        if len(fields) == 3 and fields[0].isdigit() and fields[2] not in LSF_FINISHED:
            alive.add(fields[0] if fields[1] in ("0", "-") else f"{fields[0]}[{fields[1]}]")
    return alive


def query_scheduler(job_ids: list[str]) -> tuple[str, set[str]] | None:
    """Ask squeue or bjobs (whichever is on PATH) once about every id."""
    ids = base_job_ids(job_ids)
    if shutil.which("squeue"):
        name, argv, parse = "SLURM", ["squeue", "-h", "-o", "%i", "-j", ",".join(ids)], parse_squeue
    elif shutil.which("bjobs"):
        name, argv, parse = "LSF", ["bjobs", "-noheader", "-o", "jobid jobindex stat", *ids], parse_bjobs
    else:
        return None
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=QUERY_TIMEOUT_SECONDS)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if result.returncode != 0 and not all_unknown(result.stderr):
        return None  # the scheduler did not answer: nothing can be concluded
    return name, parse(result.stdout)


def all_unknown(stderr: str) -> bool:
    """squeue and bjobs fail when no asked id exists: that is an answer (all gone)."""
    return "Invalid job id" in stderr or "is not found" in stderr


def mark_vanished_jobs(pending: list, query: Query = query_scheduler) -> None:
    """Volumes reported running whose scheduler job no longer exists become failed."""
    running = [p for p in pending if p.state == "running" and p.job_id]
    if not running:
        return
    answer = query([p.job_id for p in running])
    if answer is None:
        return
    scheduler, alive = answer
    for entry in running:
        if entry.job_id not in alive and (job_element(entry.job_id) or (entry.job_id,))[0] not in alive:
            entry.state = "failed"
            entry.error = (f"job {entry.job_id} no longer exists in {scheduler} (its host died or it was removed "
                           "without a message); resubmit with --missing-only")
