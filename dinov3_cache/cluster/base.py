"""The interface every backend fills in (`Scheduler`), in the manner of submitit's executors:
render an array into a submission, submit it, say how to watch it."""

from __future__ import annotations

import shutil
import subprocess
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

from dinov3_cache.cluster.jobs import ArrayJob, RenderedArray, array_ranges, job_script
from dinov3_cache.cluster.resources import DEFAULT_MAX_ARRAY_SIZE, Resources
from dinov3_cache.errors import CacheToolError
from dinov3_cache.layout import scheduler_logs_dir


class SchedulerError(CacheToolError):
    """A scheduler that is missing or refused a submission, said in one actionable line."""


class Scheduler(ABC):
    """Render an array into a submission, submit it, say how to watch it."""

    name: ClassVar[str]
    executable: ClassVar[str | None]  # the submission command that must be on PATH
    element_variable: ClassVar[str]  # environment variable holding the 1-based array element
    job_id_expression: ClassVar[str]  # shell expression of the element's job id, for the log header
    max_array_size: ClassVar[int | None] = DEFAULT_MAX_ARRAY_SIZE

    def check_installed(self) -> None:
        if self.executable and shutil.which(self.executable) is None:
            raise SchedulerError(
                f"{self.executable} not found on PATH: the {self.name} scheduler needs it; "
                "run this on a submission host, choose another --scheduler, or use --dry-run to see the jobs"
            )

    def check_resources(self, resources: Resources) -> None:  # noqa: B027 - most backends accept every request
        """Refuse a resource request this backend cannot honour."""

    def script(self, array: ArrayJob) -> str:
        return job_script(array, self.element_variable, self.job_id_expression)

    @abstractmethod
    def render(self, array: ArrayJob, resources: Resources) -> RenderedArray: ...

    @abstractmethod
    def submit(self, rendered: RenderedArray) -> str:
        """Hand one array to the scheduler; returns its job id."""

    @abstractmethod
    def watch_command(self, job_ids: Sequence[str]) -> str: ...

    def prepare_directories(self, output_dir: Path) -> None:
        """The schedulers do not create missing log directories (SLURM fails the job silently)."""
        scheduler_logs_dir(output_dir).mkdir(parents=True, exist_ok=True)

    def _run_submit_command(self, rendered: RenderedArray) -> str:
        try:
            result = subprocess.run(rendered.argv, input=rendered.script, capture_output=True, text=True, timeout=300)
        except FileNotFoundError:
            self.check_installed()
            raise
        if result.returncode != 0:
            reason = (result.stderr.strip() or result.stdout.strip() or f"exit status {result.returncode}").splitlines()[-1]
            raise SchedulerError(f"{self.executable} refused the array of volumes {array_ranges(rendered.array.volume_indices)}: {reason}")
        return result.stdout
