"""This machine as a scheduler: every array element as a process, at most `max_concurrent` at a
time, each on its own GPU; one line per volume as it finishes, then a summary."""

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
from dinov3_cache.errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_LOCKED, EXIT_OK
from dinov3_cache.indices import format_ranges
from dinov3_cache.paths import VolumePaths

COMPLETED, SKIPPED, FAILED, HELD = "completed", "skipped", "failed", "held"


@dataclass
class ElementResult:
    """One volume's outcome in an array element (a process that ran one or several volumes)."""

    volume_index: int
    returncode: int | None  # the element's process; None: killed at the walltime
    seconds: float
    last_error_line: str = ""
    committed: bool = False  # this run wrote the volume's metadata (the commit marker)
    present: bool = False  # the volume is complete after the run
    packed: bool = False  # the element ran several volumes: its exit status speaks for all of them
    interrupted: bool = False  # stopped by the user's Ctrl-C (its exit status and last line say nothing of the cause)

    @property
    def state(self) -> str:
        """A volume this run committed is completed; one complete before and not recommitted was
        skipped (for a single volume only when its process exited 0: else it was refused)."""
        if self.committed:
            return COMPLETED
        if self.present and (self.returncode in (0, EXIT_LOCKED) or self.packed):
            return SKIPPED  # exit 3 and complete: another run held it, then completed it
        return HELD if self.returncode == EXIT_LOCKED and not self.packed else FAILED

    def line(self) -> str:
        """The volume's one report line, printed as it finishes."""
        if self.state == COMPLETED:
            return f"volume {self.volume_index}: completed in {self.seconds:.1f} s"
        if self.state == SKIPPED:
            return f"volume {self.volume_index}: skipped, already complete (--overwrite recomputes it)"
        if self.interrupted:
            return f"volume {self.volume_index}: not complete: interrupted by the user (rerun with --missing-only)"
        if self.state == HELD:
            return f"volume {self.volume_index}: held by another live run (not a failure; --missing-only reruns it if that run fails)"
        if self.returncode is None:
            why = "killed at the walltime"
        elif self.returncode == 0:
            why = "exit 0 but no metadata file"
        else:
            why = f"exit {self.returncode}"
        return f"volume {self.volume_index}: failed ({why}): {self.last_error_line or 'see its log in OUT/logs'}"


@dataclass
class LocalRunSummary:
    results: list[ElementResult] = field(default_factory=list)

    @property
    def failed(self) -> list[ElementResult]:
        return [r for r in self.results if r.state == FAILED]

    def count(self, state: str) -> int:
        return sum(r.state == state for r in self.results)

    def line(self) -> str:
        """Completed, skipped and failed counted apart: a rerun that skips everything says so."""
        text = (f"summary: {self.count(COMPLETED)} completed, {self.count(SKIPPED)} skipped (already complete), "
                f"{self.count(FAILED)} failed")
        if self.failed:
            text += f" ({format_ranges([r.volume_index for r in self.failed])}); rerun them with --missing-only"
        if self.count(HELD):
            text += f"; {self.count(HELD)} held by another run"
        return text


def metadata_signature(path: Path) -> tuple[int, int] | None:
    """Identifies one version of a metadata file: each commit writes a new file (atomic rename)."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_mtime_ns


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
    title = "local processes"
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
                f"{', '.join(flags)} {'applies' if len(flags) == 1 else 'apply'} only to LSF and SLURM; the local backend runs on this machine: "
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

    def run_submitted(self, resources: Resources, progress: bool) -> int:
        """The processes run here, in the foreground: one line per volume, then the summary."""
        workers, gpus = self.concurrency(resources)
        volumes, processes = sum(len(r.array.volume_indices) for r in self.queued), sum(r.array.size for r in self.queued)
        print(f"running {volumes} volumes here" + (f" in {processes} process(es)" if processes != volumes else "")
              + f", {workers} at a time" + (f" on GPUs {','.join(gpus)}" if gpus else " (no GPU)"))
        if "memory_gb" in resources.explicit:
            print("note: the local backend does not limit memory; --memory-gb is only recorded")
        try:
            summary = self.run_queued(resources, progress=progress)
        except KeyboardInterrupt:
            print("error: interrupted; running volumes were stopped. Rerun with --missing-only to finish", file=sys.stderr)
            return EXIT_INTERRUPTED
        print(summary.line())  # each volume's line was printed as it finished
        return EXIT_FAILED if summary.failed else EXIT_OK

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
        sys.stdout.flush()  # what the submission printed shows before the first volume's line, also when piped

        def run_one(item: tuple[RenderedArray, int]) -> None:
            rendered, element = item
            slot = slots.get()
            try:
                results = self._run_element(rendered, element, resources, gpus[slot % len(gpus)] if gpus else None)
            finally:
                slots.put(slot)
            with lock:
                summary.results += results
                for result in results:
                    bar.write(result.line(), file=sys.stdout)  # above the bar; also when stdout is piped
                sys.stdout.flush()
                bar.update(1)
                if summary.failed:
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
        for result in (r for r in summary.results if r.state == HELD):  # held by another run then: complete now?
            result.present = metadata_signature(VolumePaths(self.queued[0].array.spec.output_dir, result.volume_index).metadata) is not None
        summary.results.sort(key=lambda r: r.volume_index)
        return summary

    def _run_element(self, rendered: RenderedArray, element: int, resources: Resources, gpu: str | None) -> list[ElementResult]:
        volume_indices = rendered.array.elements[element - 1]
        env = {**os.environ, self.element_variable: str(element), "LOCAL_JOB_ID": f"{rendered.job_id}[{element}]"}
        if not resources.gpu:
            env["CUDA_VISIBLE_DEVICES"] = ""  # --no-gpu: the run cannot see a GPU
        elif gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu  # each concurrent volume on its own GPU
        if "num_processors" in resources.explicit:
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(resources.num_processors)
        timeout = resources.walltime_minutes * 60 if "walltime" in resources.explicit else None
        volumes = [VolumePaths(rendered.array.spec.output_dir, i) for i in volume_indices]
        before = [metadata_signature(paths.metadata) for paths in volumes]
        started = time.monotonic()
        if self._stopping:
            return [ElementResult(i, -signal.SIGTERM, 0.0, interrupted=True) for i in volume_indices]
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
        seconds, error_line = time.monotonic() - started, last_line(volumes[0].log_err)  # the element's log
        results = []
        for paths, previous in zip(volumes, before, strict=True):
            after = metadata_signature(paths.metadata)
            results.append(ElementResult(paths.volume_index, returncode, seconds, error_line, committed=after is not None and after != previous,
                                         present=after is not None, packed=len(volumes) > 1, interrupted=self._stopping))
        return results

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
