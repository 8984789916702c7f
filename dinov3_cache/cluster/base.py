"""The interface every backend fills in (`Scheduler`), in the manner of submitit's executors:
the base class does the work (submitting, asking which jobs are alive, naming log files), each
backend fills small hooks: how it renders an array, the job id its submission command prints,
the job id and array element its jobs find in their environment, the format of a recorded
element id, the placeholders of its log file names, its liveness query and the lines its kills
leave in the logs. docs/cluster.md lists what a new backend provides."""

from __future__ import annotations

import re
import shutil
import subprocess
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from dinov3_cache.cluster.jobs import ArrayJob, RenderedArray, array_ranges, job_script
from dinov3_cache.cluster.resources import DEFAULT_MAX_ARRAY_SIZE, Resources
from dinov3_cache.errors import CacheToolError
from dinov3_cache.paths import LOGS_DIR

SCHEDULER_LOGS_DIR = "scheduler"  # under logs/: LSF/SLURM -o/-e files, where kill notices land
SCHEDULER_LOG_RE = re.compile(r"^.+_(?P<job>\d+)_(?P<element>\d+)\.(?:out|err)$")  # scheduler_log_name's files
LIVENESS_TIMEOUT_SECONDS = 10


def scheduler_logs_dir(output_dir: Path | str) -> Path:
    return Path(output_dir) / LOGS_DIR / SCHEDULER_LOGS_DIR


def scheduler_log_name(job_name: str, job_id: str, element: str, stream: str) -> str:
    """NAME_JOBID_ELEMENT.out|.err under logs/scheduler/; the scheduler fills in the ids
    from its placeholders (LSF %J and %I, SLURM %A and %a)."""
    return f"{job_name}_{job_id}_{element}.{stream}"


class SchedulerError(CacheToolError):
    """A scheduler that is missing or refused a submission, said in one actionable line."""


@dataclass(frozen=True)
class KillSignature:
    """A line a kill leaves in a job's logs, and what to do about it."""

    kind: str  # out_of_memory | walltime | gpu_out_of_memory | preempted | node_failure | cancelled
    scheduler: str
    pattern: re.Pattern
    advice: str


def kill_signature(kind: str, scheduler: str, pattern: str, advice: str) -> KillSignature:
    return KillSignature(kind, scheduler, re.compile(pattern), advice)


class Scheduler(ABC):
    """Render an array into a submission, submit it, say how to watch it, and read back what
    its jobs leave: their ids, their log files, whether they are alive, how they were killed."""

    name: ClassVar[str]  # the --scheduler choice
    title: ClassVar[str]  # how messages name it
    executable: ClassVar[str | None]  # the submission command that must be on PATH
    element_variable: ClassVar[str]  # environment variable holding the 1-based array element
    job_id_expression: ClassVar[str]  # shell expression of the element's job id, for the log header
    max_array_size: ClassVar[int | None] = DEFAULT_MAX_ARRAY_SIZE
    # the scheduler's placeholders for the job id and array element in its -o/-e file names
    log_placeholders: ClassVar[tuple[str, str] | None] = None
    job_element_re: ClassVar[re.Pattern | None] = None  # a recorded element id: groups job, element
    liveness_executable: ClassVar[str | None] = None  # the query command (squeue, bjobs), if any
    unknown_job_message: ClassVar[str | None] = None  # what the query says when no asked id exists
    kill_signatures: ClassVar[tuple[KillSignature, ...]] = ()  # most specific first

    # ---- hooks

    @abstractmethod
    def render(self, array: ArrayJob, resources: Resources) -> RenderedArray: ...

    def parse_submit_output(self, stdout: str) -> str:
        """The job id in what the submission command printed."""
        raise NotImplementedError

    @classmethod
    def environment_job_id(cls, env: Mapping[str, str]) -> str | None:
        """The running job's id (JOB[ELEMENT], JOB_ELEMENT) from the variables this scheduler
        sets, or None outside its jobs."""
        return None

    def liveness_argv(self, job_ids: Sequence[str]) -> list[str]:
        raise NotImplementedError

    def parse_liveness(self, output: str) -> set[str]:
        """The ids (plain or element) that the liveness query lists as still queued or running."""
        raise NotImplementedError

    @abstractmethod
    def watch_command(self, job_ids: Sequence[str]) -> str: ...

    def check_resources(self, resources: Resources) -> None:  # noqa: B027 - most backends accept every request
        """Refuse a resource request this backend cannot honour."""

    def run_submitted(self, resources: Resources, progress: bool) -> int | None:
        """Run the submitted arrays here and return the exit status, for a backend that runs
        them itself; None: the scheduler runs them, the submission is done."""
        return None

    # ---- the work, shared

    def check_installed(self) -> None:
        if self.executable and shutil.which(self.executable) is None:
            raise SchedulerError(
                f"{self.executable} not found on PATH: the {self.name} scheduler needs it; "
                "run this on a submission host, choose another --scheduler, or use --dry-run to see the jobs"
            )

    def script(self, array: ArrayJob) -> str:
        return job_script(array, self.element_variable, self.job_id_expression)

    def log_file(self, output_dir: Path, job_name: str, stream: str) -> Path:
        """The -o/-e file of every element, with the scheduler's placeholders in its name."""
        assert self.log_placeholders is not None, f"{self.name} writes no scheduler log files"
        return scheduler_logs_dir(output_dir) / scheduler_log_name(job_name, *self.log_placeholders, stream)

    @classmethod
    def job_element(cls, job_id: str | None) -> tuple[str, int] | None:
        """(job id, array element) of a recorded element id in this scheduler's format, else None."""
        match = cls.job_element_re.fullmatch(job_id or "") if cls.job_element_re else None
        return (match.group("job"), int(match.group("element"))) if match else None

    def submit(self, rendered: RenderedArray) -> str:
        """Hand one array to the scheduler; returns its job id."""
        stdout = self._run_submit_command(rendered)
        rendered.job_id = self.parse_submit_output(stdout)
        return rendered.job_id

    def prepare_directories(self, output_dir: Path) -> None:
        """The schedulers do not create missing log directories (SLURM fails the job silently)."""
        scheduler_logs_dir(output_dir).mkdir(parents=True, exist_ok=True)

    def can_query_liveness(self) -> bool:
        return self.liveness_executable is not None and shutil.which(self.liveness_executable) is not None

    def query_alive(self, job_ids: Sequence[str]) -> set[str] | None:
        """Which of these (array or plain) job ids, or their elements, still exist: one query,
        a short timeout; None when the scheduler did not answer (nothing can be concluded)."""
        try:
            result = subprocess.run(self.liveness_argv(job_ids), capture_output=True, text=True, timeout=LIVENESS_TIMEOUT_SECONDS)
        except (OSError, subprocess.TimeoutExpired):
            return None
        # the query fails when no asked id exists: that is an answer (all gone)
        if result.returncode != 0 and not (self.unknown_job_message and self.unknown_job_message in result.stderr):
            return None
        return self.parse_liveness(result.stdout)

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
