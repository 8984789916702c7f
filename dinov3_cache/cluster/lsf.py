"""IBM Spectrum LSF: one `bsub` job array per ArrayJob, the job script on standard input;
element ids JOB[ELEMENT]; liveness from `bjobs`; kills named by TERM_* in the job report."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

from dinov3_cache.cluster.base import Scheduler, SchedulerError, kill_signature
from dinov3_cache.cluster.jobs import ArrayJob, RenderedArray
from dinov3_cache.cluster.resources import Resources

LSF_FINISHED = {"DONE", "EXIT"}  # states of jobs bjobs still lists though they are gone


class LsfScheduler(Scheduler):
    name = "lsf"
    title = "LSF"
    executable = "bsub"
    element_variable = "LSB_JOBINDEX"
    job_id_expression = "${LSB_JOBID:-}[${LSB_JOBINDEX:-}]"
    log_placeholders = ("%J", "%I")
    job_element_re = re.compile(r"(?P<job>\d+)\[(?P<element>\d+)\]")
    liveness_executable = "bjobs"
    unknown_job_message = "is not found"
    # what LSF's job report (in the -o file) says of a kill
    kill_signatures = (
        kill_signature("out_of_memory", "LSF", r"TERM_MEMLIMIT", "raise --memory-gb"),
        kill_signature("walltime", "LSF", r"TERM_RUNLIMIT", "raise --walltime"),
        kill_signature("preempted", "LSF", r"TERM_PREEMPT", "resubmit with --missing-only"),
        kill_signature("cancelled", "LSF", r"TERM_OWNER|TERM_ADMIN", "resubmit with --missing-only"),
    )

    def render(self, array: ArrayJob, resources: Resources) -> RenderedArray:
        r, spec = resources, array.spec
        throttle = f"%{r.max_concurrent}" if r.max_concurrent else ""
        argv = [
            "bsub",
            "-J", f"{spec.name}[1-{array.size}]{throttle}",
            "-n", str(r.num_processors),
            # one host for all slots; units given explicitly so LSF_UNIT_FOR_LIMITS cannot rescale them
            "-R", f"span[hosts=1] rusage[mem={r.memory_mb}MB]",
            "-M", f"{r.memory_mb}MB",
            "-W", r.walltime_hh_mm,
        ]
        if r.gpu:
            argv += ["-gpu", "num=1" + (f":gmem={math.ceil(r.gpu_memory_gb * 1024)}M" if r.gpu_memory_gb else "")]
        argv += ["-q", r.queue] if r.queue else []
        argv += ["-P", r.project] if r.project else []
        argv += ["-o", str(self.log_file(spec.output_dir, spec.name, "out")),
                 "-e", str(self.log_file(spec.output_dir, spec.name, "err"))]
        argv += list(r.scheduler_args)
        return RenderedArray(array, argv, self.script(array))

    def parse_submit_output(self, stdout: str) -> str:
        """bsub prints 'Job <4711> is submitted to queue <normal>.'"""
        match = re.search(r"Job <(\d+)>", stdout)
        if not match:
            raise SchedulerError(f"bsub did not report a job id (it said: {stdout.strip()[:200]!r})")
        return match.group(1)

    @classmethod
    def environment_job_id(cls, env: Mapping[str, str]) -> str | None:
        if not env.get("LSB_JOBID"):
            return None
        index = env.get("LSB_JOBINDEX", "0")  # 0: not an array job
        return env["LSB_JOBID"] + (f"[{index}]" if index not in ("", "0") else "")

    def liveness_argv(self, job_ids: Sequence[str]) -> list[str]:
        return ["bjobs", "-noheader", "-o", "jobid jobindex stat", *job_ids]

    def parse_liveness(self, output: str) -> set[str]:
        """`bjobs -noheader -o 'jobid jobindex stat'` lines: '12 3 RUN' ('0': not an array);
        finished jobs (DONE, EXIT) that LSF still lists are gone."""
        alive: set[str] = set()
        for line in output.splitlines():
            fields = line.split()
            if len(fields) == 3 and fields[0].isdigit() and fields[2] not in LSF_FINISHED:
                alive.add(fields[0] if fields[1] in ("0", "-") else f"{fields[0]}[{fields[1]}]")
        return alive

    def watch_command(self, job_ids: Sequence[str]) -> str:
        return f"bjobs -A {' '.join(job_ids)}"
