"""IBM Spectrum LSF: one `bsub` job array per ArrayJob, the job script on standard input."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from dinov3_cache.cluster.base import Scheduler, SchedulerError
from dinov3_cache.cluster.jobs import ArrayJob, RenderedArray
from dinov3_cache.cluster.resources import Resources
from dinov3_cache.layout import scheduler_log_name, scheduler_logs_dir


class LsfScheduler(Scheduler):
    name = "lsf"
    executable = "bsub"
    element_variable = "LSB_JOBINDEX"
    job_id_expression = "${LSB_JOBID:-}[${LSB_JOBINDEX:-}]"

    def render(self, array: ArrayJob, resources: Resources) -> RenderedArray:
        r, logs = resources, scheduler_logs_dir(array.spec.output_dir)
        throttle = f"%{r.max_concurrent}" if r.max_concurrent else ""
        argv = [
            "bsub",
            "-J", f"{array.spec.name}[1-{array.size}]{throttle}",
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
        argv += ["-o", str(logs / scheduler_log_name(array.spec.name, "%J", "%I", "out")),
                 "-e", str(logs / scheduler_log_name(array.spec.name, "%J", "%I", "err"))]
        argv += list(r.scheduler_args)
        return RenderedArray(array, argv, self.script(array))

    def submit(self, rendered: RenderedArray) -> str:
        stdout = self._run_submit_command(rendered)
        match = re.search(r"Job <(\d+)>", stdout)
        if not match:
            raise SchedulerError(f"bsub did not report a job id (it said: {stdout.strip()[:200]!r})")
        rendered.job_id = match.group(1)
        return rendered.job_id

    def watch_command(self, job_ids: Sequence[str]) -> str:
        return f"bjobs -A {' '.join(job_ids)}"
