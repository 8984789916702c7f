"""SLURM: one `sbatch --array` per ArrayJob, the job script on standard input."""

from __future__ import annotations

import re
from collections.abc import Sequence

from dinov3_cache.cluster.base import Scheduler, SchedulerError
from dinov3_cache.cluster.jobs import ArrayJob, RenderedArray
from dinov3_cache.cluster.resources import ResourceError, Resources
from dinov3_cache.layout import scheduler_log_name, scheduler_logs_dir


class SlurmScheduler(Scheduler):
    name = "slurm"
    executable = "sbatch"
    element_variable = "SLURM_ARRAY_TASK_ID"
    job_id_expression = "${SLURM_ARRAY_JOB_ID:-}_${SLURM_ARRAY_TASK_ID:-}"

    def check_resources(self, resources: Resources) -> None:
        if resources.gpu_memory_gb is not None:
            raise ResourceError(
                "--gpu-memory-gb has no SLURM equivalent; ask for a GPU type instead, "
                "e.g. --scheduler-args='--gres=gpu:a100:1' or '--constraint=...', and drop --gpu-memory-gb"
            )

    def render(self, array: ArrayJob, resources: Resources) -> RenderedArray:
        r, logs = resources, scheduler_logs_dir(array.spec.output_dir)
        throttle = f"%{r.max_concurrent}" if r.max_concurrent else ""
        argv = [
            "sbatch", "--parsable",
            f"--job-name={array.spec.name}",
            f"--array=1-{array.size}{throttle}",
            "--nodes=1", "--ntasks=1",
            f"--cpus-per-task={r.num_processors}",
            f"--mem={r.memory_mb}M",
            # SLURM reads 'H:MM' as minutes:seconds, so spell out hours:minutes:seconds
            f"--time={r.walltime_hh_mm}:00",
        ]
        argv += ["--gres=gpu:1"] if r.gpu else []
        argv += [f"--partition={r.queue}"] if r.queue else []
        argv += [f"--account={r.project}"] if r.project else []
        argv += [f"--output={logs / scheduler_log_name(array.spec.name, '%A', '%a', 'out')}",
                 f"--error={logs / scheduler_log_name(array.spec.name, '%A', '%a', 'err')}"]
        argv += list(r.scheduler_args)
        return RenderedArray(array, argv, self.script(array))

    def submit(self, rendered: RenderedArray) -> str:
        stdout = self._run_submit_command(rendered).strip()
        match = re.fullmatch(r"(\d+)(;.*)?", stdout.splitlines()[-1] if stdout else "")
        if not match:
            raise SchedulerError(f"sbatch did not report a job id (it said: {stdout[:200]!r})")
        rendered.job_id = match.group(1)
        return rendered.job_id

    def watch_command(self, job_ids: Sequence[str]) -> str:
        return f"squeue -j {','.join(job_ids)}"
