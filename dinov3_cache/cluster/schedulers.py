"""Run one command per volume index on LSF, SLURM or this machine: the backends by name, and
the choice of one. The job is data (jobs.py), each backend renders it (lsf.py, slurm.py,
local.py) behind one interface (base.py); resources.py parses what the jobs ask for."""

from __future__ import annotations

import shutil

from dinov3_cache.cluster.base import Scheduler
from dinov3_cache.cluster.local import LocalScheduler
from dinov3_cache.cluster.lsf import LsfScheduler
from dinov3_cache.cluster.slurm import SlurmScheduler

SCHEDULERS: dict[str, type[Scheduler]] = {"lsf": LsfScheduler, "slurm": SlurmScheduler, "local": LocalScheduler}


def choose_scheduler(name: str | None) -> tuple[Scheduler, str]:
    """The named backend, or whichever of bsub / sbatch is on PATH, else local; with the reason."""
    if name:
        return SCHEDULERS[name](), "chosen with --scheduler"
    for candidate in (LsfScheduler, SlurmScheduler):
        if shutil.which(candidate.executable):
            return candidate(), f"{candidate.executable} found on PATH"
    return LocalScheduler(), "neither bsub nor sbatch on PATH"
