"""Which recorded scheduler jobs still exist: a job whose host died leaves no message and
its status record says 'running' forever. The scheduler's backend answers for every recorded
job id in one query (cluster/: squeue, bjobs); a volume whose job is gone is reported failed."""

from __future__ import annotations

from collections.abc import Callable

from dinov3_cache.cluster.schedulers import job_element, query_live_jobs

# (scheduler title, the ids still alive) or None when no scheduler could answer
Query = Callable[[list[str]], "tuple[str, set[str]] | None"]


def mark_vanished_jobs(pending: list, query: Query = query_live_jobs) -> None:
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
