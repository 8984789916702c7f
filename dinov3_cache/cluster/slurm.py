"""SLURM: one `sbatch --array` per ArrayJob, the job script on standard input; element ids
JOB_ELEMENT; liveness from `squeue`; kills named by slurmstepd's CANCELLED / oom lines."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from dinov3_cache.cluster.base import Scheduler, SchedulerError, kill_signature
from dinov3_cache.cluster.jobs import ArrayJob, RenderedArray
from dinov3_cache.cluster.resources import ResourceError, Resources

# `squeue -o %i`: '12', '12_3', or a pending range '12_[4-9%2]'
SQUEUE_ID_RE = re.compile(r"^(?P<job>\d+)(?:_(?:(?P<one>\d+)|\[(?P<ranges>[^\]]+)\]))?$")


class SlurmScheduler(Scheduler):
    name = "slurm"
    title = "SLURM"
    executable = "sbatch"
    element_variable = "SLURM_ARRAY_TASK_ID"
    job_id_expression = "${SLURM_ARRAY_JOB_ID:-}_${SLURM_ARRAY_TASK_ID:-}"
    log_placeholders = ("%A", "%a")
    job_element_re = re.compile(r"(?P<job>\d+)_(?P<element>\d+)")
    liveness_executable = "squeue"
    unknown_job_message = "Invalid job id"
    # what slurmstepd / srun print on a job's stderr when it is killed
    kill_signatures = (
        kill_signature("out_of_memory", "SLURM", r"oom[-_]kill event|Exceeded job memory limit|task \d+: Out Of Memory", "raise --memory-gb"),
        kill_signature("walltime", "SLURM", r"CANCELLED AT \S+ DUE TO TIME LIMIT", "raise --walltime"),
        kill_signature("preempted", "SLURM", r"CANCELLED AT \S+ DUE TO PREEMPTION", "resubmit with --missing-only"),
        kill_signature("node_failure", "SLURM", r"DUE TO NODE FAILURE", "resubmit with --missing-only"),
        kill_signature("cancelled", "SLURM", r"CANCELLED AT \S+ \*\*\*", "resubmit with --missing-only"),
    )

    def check_resources(self, resources: Resources) -> None:
        if resources.gpu_memory_gb is not None:
            raise ResourceError(
                "--gpu-memory-gb has no SLURM equivalent; ask for a GPU type instead, "
                "e.g. --scheduler-args='--gres=gpu:a100:1' or '--constraint=...', and drop --gpu-memory-gb"
            )

    def render(self, array: ArrayJob, resources: Resources) -> RenderedArray:
        r, spec = resources, array.spec
        throttle = f"%{r.max_concurrent}" if r.max_concurrent else ""
        argv = [
            "sbatch", "--parsable",
            f"--job-name={spec.name}",
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
        argv += [f"--output={self.log_file(spec.output_dir, spec.name, 'out')}",
                 f"--error={self.log_file(spec.output_dir, spec.name, 'err')}"]
        argv += list(r.scheduler_args)
        return RenderedArray(array, argv, self.script(array))

    def parse_submit_output(self, stdout: str) -> str:
        """sbatch --parsable prints 'JOBID' or 'JOBID;CLUSTER' on its last line."""
        stdout = stdout.strip()
        match = re.fullmatch(r"(\d+)(;.*)?", stdout.splitlines()[-1] if stdout else "")
        if not match:
            raise SchedulerError(f"sbatch did not report a job id (it said: {stdout[:200]!r})")
        return match.group(1)

    @classmethod
    def environment_job_id(cls, env: Mapping[str, str]) -> str | None:
        if env.get("SLURM_ARRAY_JOB_ID"):
            return f"{env['SLURM_ARRAY_JOB_ID']}_{env.get('SLURM_ARRAY_TASK_ID', '')}"
        return env.get("SLURM_JOB_ID") or None

    def liveness_argv(self, job_ids: Sequence[str]) -> list[str]:
        return ["squeue", "-h", "-o", "%i", "-j", ",".join(job_ids)]

    def parse_liveness(self, output: str) -> set[str]:
        """`squeue -h -o %i` lines: '12', '12_3', or a pending range '12_[4-9%2]' (expanded)."""
        alive: set[str] = set()
        for line in output.split():
            match = SQUEUE_ID_RE.match(line.strip())
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

    def watch_command(self, job_ids: Sequence[str]) -> str:
        return f"squeue -j {','.join(job_ids)}"
