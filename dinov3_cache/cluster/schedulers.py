"""Run one command per volume index on LSF, SLURM or this machine: the backends by name, the
choice of one, and the questions asked of every backend at once (the running job's id, the
format of a recorded id, which jobs are alive, how kills show). The job is data (jobs.py),
each backend renders it (lsf.py, slurm.py, local.py) behind one interface (base.py);
resources.py parses what the jobs ask for. A new backend is one module and one entry here."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Mapping

from dinov3_cache.cluster.base import KillSignature, Scheduler
from dinov3_cache.cluster.local import LocalScheduler
from dinov3_cache.cluster.lsf import LsfScheduler
from dinov3_cache.cluster.slurm import SlurmScheduler
from dinov3_cache.errors import UsageError

# in the order of preference when none is named: the first whose submission command is installed
SCHEDULERS: dict[str, type[Scheduler]] = {"lsf": LsfScheduler, "slurm": SlurmScheduler, "local": LocalScheduler}


# volumes a submission runs on this machine when no scheduler is installed and none was named;
# more must be asked for with --scheduler local (1,000 volumes on a login node is a mistake)
UNNAMED_LOCAL_VOLUMES = 16


def choose_scheduler(name: str | None, volumes: int = 0) -> tuple[Scheduler, str]:
    """The named backend, or the first one whose submission command is on PATH; with the reason.
    Falling back to this machine for more than UNNAMED_LOCAL_VOLUMES volumes is refused."""
    if name:
        return SCHEDULERS[name](), "chosen with --scheduler"
    for backend in SCHEDULERS.values():
        if backend.executable is None:
            installed = [b.executable for b in SCHEDULERS.values() if b.executable]
            reason = f"neither {' nor '.join(installed)} on PATH"
            if volumes > UNNAMED_LOCAL_VOLUMES:
                raise UsageError(
                    f"{reason}: {volumes} volumes would run on this machine, one after another; pass --scheduler "
                    f"{backend.name} to run them here (up to {UNNAMED_LOCAL_VOLUMES} run here without it), or submit "
                    f"from a machine with {' or '.join(installed)}")
            return backend(), reason
        if shutil.which(backend.executable):
            return backend(), f"{backend.executable} found on PATH"
    raise AssertionError("the last backend runs on this machine")


def current_job_id(env: Mapping[str, str] | None = None) -> str | None:
    """The id of the scheduler job this process runs in (with its array element), or None."""
    env = os.environ if env is None else env
    return next((job_id for backend in SCHEDULERS.values() if (job_id := backend.environment_job_id(env))), None)


def job_element(job_id: str | None) -> tuple[str, int] | None:
    """(job id, array element) of a recorded element id of any backend, or None for a plain id."""
    return next((element for backend in SCHEDULERS.values() if (element := backend.job_element(job_id))), None)


def base_job_ids(job_ids: Iterable[str]) -> list[str]:
    """The array (or plain) job ids to ask about: '12_3' and '12[3]' ask about 12."""
    return sorted({element[0] if (element := job_element(j)) else j for j in job_ids}, key=lambda j: (len(j), j))


def query_live_jobs(job_ids: list[str]) -> tuple[str, set[str]] | None:
    """Ask the first backend whose liveness query is installed, once, about every id: its title
    and the ids still alive; None when no scheduler could answer."""
    for backend in SCHEDULERS.values():
        scheduler = backend()
        if scheduler.can_query_liveness():
            alive = scheduler.query_alive(base_job_ids(job_ids))
            return None if alive is None else (scheduler.title, alive)
    return None


def scheduler_kill_signatures() -> tuple[KillSignature, ...]:
    """How every backend's kills show in its logs, most specific first within each."""
    return tuple(signature for backend in SCHEDULERS.values() for signature in backend.kill_signatures)
