"""This machine as a scheduler: every array element as a process, at most `max_concurrent` at a
time, each on its own GPU."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from queue import Queue

from dinov3_cache.cluster.base import Scheduler
from dinov3_cache.cluster.jobs import ArrayJob, RenderedArray
from dinov3_cache.cluster.resources import ResourceError, Resources
from dinov3_cache.layout import VolumePaths


@dataclass
class ElementResult:
    volume_index: int  # the element's first volume
    returncode: int | None  # None: killed at the walltime
    seconds: float
    last_error_line: str = ""
    volume_indices: tuple[int, ...] = ()  # every volume of the element (one process)


@dataclass
class LocalRunSummary:
    results: list[ElementResult] = field(default_factory=list)

    @property
    def failed(self) -> list[ElementResult]:
        return [r for r in self.results if r.returncode != 0]


def visible_gpus() -> list[str]:
    """GPU ids this machine offers: CUDA_VISIBLE_DEVICES if set, else what nvidia-smi lists."""
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        return [g for g in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if g.strip() and g.strip() != "-1"]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [str(i) for i, line in enumerate(listing.splitlines()) if line.startswith("GPU ")]


class LocalScheduler(Scheduler):
    """Processes on this machine, at most `max_concurrent` at a time, each with its own GPU."""

    name = "local"
    executable = None
    element_variable = "LOCAL_ARRAY_ELEMENT"
    job_id_expression = "${LOCAL_JOB_ID:-}"
    max_array_size = None  # no scheduler limit: one array
    CLUSTER_ONLY = ("queue", "project", "scheduler_args", "gpu_memory_gb")

    def __init__(self) -> None:
        self.queued: list[RenderedArray] = []
        self._running: set[subprocess.Popen] = set()
        self._stopping = False

    def check_resources(self, resources: Resources) -> None:
        flags = [f"--{name.replace('_', '-')}" for name in self.CLUSTER_ONLY if name in resources.explicit]
        if flags:
            raise ResourceError(
                f"{', '.join(flags)} only apply to LSF and SLURM; the local backend runs on this machine: "
                "drop them or choose --scheduler lsf|slurm"
            )

    def render(self, array: ArrayJob, resources: Resources) -> RenderedArray:
        return RenderedArray(array, [], self.script(array))

    def submit(self, rendered: RenderedArray) -> str:
        rendered.job_id = f"local-{os.getpid()}-{len(self.queued) + 1}"
        self.queued.append(rendered)
        return rendered.job_id

    def watch_command(self, job_ids: Sequence[str]) -> str:
        return "(runs in the foreground; each volume's output is in OUT/logs/volume_XXXXXX.out|.err)"

    def prepare_directories(self, output_dir: Path) -> None:
        VolumePaths(output_dir, 0).logs.mkdir(parents=True, exist_ok=True)

    def concurrency(self, resources: Resources) -> tuple[int, list[str]]:
        """Default: one volume per GPU, or one at a time on CPU (each run uses every core)."""
        gpus = visible_gpus() if resources.gpu else []
        return resources.max_concurrent or max(1, len(gpus)), gpus

    def run_queued(self, resources: Resources, progress: bool = True) -> LocalRunSummary:
        """Run every queued element; returns when all have finished."""
        workers, gpus = self.concurrency(resources)
        slots: Queue[int] = Queue()
        for slot in range(workers):
            slots.put(slot)
        elements = [(rendered, k) for rendered in self.queued for k in range(1, rendered.array.size + 1)]
        summary, lock = LocalRunSummary(), threading.Lock()
        bar = _progress_bar(len(elements), progress)

        def run_one(item: tuple[RenderedArray, int]) -> None:
            rendered, element = item
            slot = slots.get()
            try:
                result = self._run_element(rendered, element, resources, gpus[slot % len(gpus)] if gpus else None)
            finally:
                slots.put(slot)
            with lock:
                summary.results.append(result)
                bar.update(1)
                if result.returncode != 0:
                    bar.set_postfix_str(f"{len(summary.failed)} failed")

        pool = ThreadPoolExecutor(max_workers=workers)
        try:
            list(pool.map(run_one, elements))
        except KeyboardInterrupt:
            self._stop_running()  # elements run in their own sessions: Ctrl-C does not reach them
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            bar.close()
        summary.results.sort(key=lambda r: r.volume_index)
        return summary

    def _run_element(self, rendered: RenderedArray, element: int, resources: Resources, gpu: str | None) -> ElementResult:
        volume_indices = rendered.array.elements[element - 1]
        volume_index = volume_indices[0]
        env = {**os.environ, self.element_variable: str(element), "LOCAL_JOB_ID": f"{rendered.job_id}[{element}]"}
        if not resources.gpu:
            env["CUDA_VISIBLE_DEVICES"] = ""  # --no-gpu: the run cannot see a GPU
        elif gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu  # each concurrent volume on its own GPU
        if "num_processors" in resources.explicit:
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(resources.num_processors)
        timeout = resources.walltime_minutes * 60 if "walltime" in resources.explicit else None
        started = time.monotonic()
        if self._stopping:
            return ElementResult(volume_index, -signal.SIGTERM, 0.0, "not started: interrupted", volume_indices)
        process = subprocess.Popen(["/bin/sh", "-s"], stdin=subprocess.PIPE, env=env, text=True, start_new_session=True)
        self._running.add(process)
        try:
            process.communicate(rendered.script, timeout=timeout)
            returncode: int | None = process.returncode
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # the whole element: sh and its python
            process.wait()
            returncode = None
        finally:
            self._running.discard(process)
        log_err = VolumePaths(rendered.array.spec.output_dir, volume_index).log_err
        return ElementResult(volume_index, returncode, time.monotonic() - started, last_line(log_err), volume_indices)


    def _stop_running(self) -> None:
        self._stopping = True
        for process in list(self._running):
            try:
                os.killpg(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass


def last_line(path: Path) -> str:
    """The last non-empty line of a log file: the error line of a failed run."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 4096))
            lines = [line for line in f.read().decode(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1].strip() if lines else ""


def _progress_bar(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="volume", desc="volumes", disable=not enabled, file=sys.stderr)
