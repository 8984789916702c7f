"""Run one command per volume index on LSF, SLURM or this machine.

One small class per backend behind one interface (`Scheduler`), in the manner of submitit:
the job is data. A `JobSpec` says what every array element runs (the interpreter, the
script and its options); an `ArrayJob` is the list of volume indices of one job array; a
backend renders an array into the exact submission command and job script
(`RenderedArray`), which a dry run prints and `submit` hands to the scheduler.

Array elements are numbered 1..n (LSF's array indices start at 1), and the job script maps
element k to its volume index explicitly, so volume indices need not fit the scheduler's
array index range. Every element writes its output to logs/volume_XXXXXX.out|.err
(`cache_layout.VolumePaths`); the scheduler's own files, where kill notices land, go to
logs/scheduler/.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from queue import Queue
from typing import ClassVar, Sequence

from dinov3_cache.errors import CacheToolError
from dinov3_cache.indices import format_ranges
from dinov3_cache.layout import VolumePaths, scheduler_logs_dir

DEFAULT_MAX_ARRAY_SIZE = 1000  # LSF's MAX_JOB_ARRAY_SIZE and SLURM's MaxArraySize default to about this
DEFAULT_JOB_NAME = "dinov3_preprocess"
DEFAULT_NUM_PROCESSORS = 16
DEFAULT_MEMORY_GB = 64.0
DEFAULT_WALLTIME = "2:00"


class SchedulerError(CacheToolError):
    """Bad input or a failed submission, said in one actionable line."""


# ----------------------------------------------------------------------------- parsing user values


def parse_walltime(text: str) -> int:
    """LSF's `-W` form, [hours:]minutes ('2:00' is two hours, '90' ninety minutes), as minutes."""
    match = re.fullmatch(r"(?:(\d+):)?(\d+)", text.strip())
    if not match or (match.group(1) is not None and int(match.group(2)) >= 60):
        raise SchedulerError(f"--walltime {text!r} is not [hours:]minutes; write e.g. 2:00 for two hours or 90 for 90 minutes")
    minutes = int(match.group(1) or 0) * 60 + int(match.group(2))
    if minutes <= 0:
        raise SchedulerError(f"--walltime {text!r} is zero; give a positive time such as 0:30")
    return minutes


def parse_memory_gb(text: str) -> float:
    """Gigabytes, optionally with a G/GB suffix (or M/MB for megabytes)."""
    match = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)\s*(G|GB|M|MB)?", text.strip(), re.IGNORECASE)
    if not match:
        raise SchedulerError(f"--memory-gb {text!r} is not a memory size; give gigabytes, e.g. 64 or 0.5 (or 512M)")
    value = float(match.group(1)) / (1024 if (match.group(2) or "G").upper().startswith("M") else 1)
    if value <= 0:
        raise SchedulerError(f"--memory-gb {text!r} must be positive")
    return value


def array_ranges(indices) -> str:
    """[1, 2, 3, 7] -> '1-3,7': the array index syntax LSF and SLURM share."""
    return format_ranges(indices, separator=",")


# ----------------------------------------------------------------------------- the job as data


@dataclass(frozen=True)
class Resources:
    """What every array element asks of the scheduler. `explicit` names the options the user gave."""

    num_processors: int = DEFAULT_NUM_PROCESSORS
    memory_gb: float = DEFAULT_MEMORY_GB
    walltime_minutes: int = 120
    gpu: bool = True
    gpu_memory_gb: float | None = None
    queue: str | None = None
    project: str | None = None
    max_concurrent: int | None = None
    scheduler_args: tuple[str, ...] = ()
    explicit: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if self.num_processors < 1:
            raise SchedulerError(f"--num-processors must be at least 1, got {self.num_processors}")
        if self.max_concurrent is not None and self.max_concurrent < 1:
            raise SchedulerError(f"--max-concurrent must be at least 1, got {self.max_concurrent}")
        if self.gpu_memory_gb is not None and self.gpu_memory_gb <= 0:
            raise SchedulerError(f"--gpu-memory-gb must be positive, got {self.gpu_memory_gb}")

    @property
    def memory_mb(self) -> int:
        return math.ceil(self.memory_gb * 1024)

    @property
    def walltime_hh_mm(self) -> str:
        return f"{self.walltime_minutes // 60}:{self.walltime_minutes % 60:02d}"

    def to_record(self) -> dict:
        record = asdict(self)
        record["explicit"] = sorted(self.explicit)
        record["scheduler_args"] = list(self.scheduler_args)
        return record


@dataclass(frozen=True)
class JobSpec:
    """What each array element runs: `command` followed by `--volume-index N`."""

    name: str
    output_dir: Path
    command: tuple[str, ...]
    workdir: Path

    @classmethod
    def preprocess_volume(cls, output_dir: Path, extraction_argv: Sequence[str], name: str = DEFAULT_JOB_NAME) -> "JobSpec":
        """Run preprocess_volume.py (beside this module) with this interpreter and these options."""
        script = Path(__file__).resolve().with_name("preprocess_volume.py")
        return cls(name, Path(output_dir).absolute(), (sys.executable, str(script), *extraction_argv), Path.cwd())

    def volume_argv(self, volume_index: int | str) -> list[str]:
        return [*self.command, "--volume-index", str(volume_index)]


@dataclass(frozen=True)
class ArrayJob:
    """One job array: element k (1-based) processes volume_indices[k - 1]."""

    spec: JobSpec
    volume_indices: tuple[int, ...]

    @property
    def size(self) -> int:
        return len(self.volume_indices)


def split_arrays(spec: JobSpec, indices: Sequence[int], max_array_size: int | None) -> list[ArrayJob]:
    """Consecutive slices of at most max_array_size volumes (None: no limit): one job array each."""
    if max_array_size is None:
        max_array_size = max(1, len(indices))
    if max_array_size < 1:
        raise SchedulerError(f"--max-array-size must be at least 1, got {max_array_size}")
    return [ArrayJob(spec, tuple(indices[i : i + max_array_size])) for i in range(0, len(indices), max_array_size)]


@dataclass
class RenderedArray:
    """The exact submission: `argv` (empty for local) receives `script` on standard input."""

    array: ArrayJob
    argv: list[str]
    script: str
    job_id: str | None = None

    def printable(self) -> str:
        command = shlex.join(self.argv) + " < job-script" if self.argv else "(run on this machine)"
        return f"# array of {self.array.size} volumes: {array_ranges(self.array.volume_indices)}\n{command}\n# job-script:\n{self.script}"

    def to_record(self) -> dict:
        return {"job_id": self.job_id, "indices": list(self.array.volume_indices), "submit_command": self.argv, "script": self.script}


def job_script(array: ArrayJob, element_variable: str, job_id_expression: str) -> str:
    """A POSIX sh script that maps its array element to a volume index, then runs that volume
    with its output appended to the volume's own log files."""
    spec, q = array.spec, shlex.quote
    cases = []
    for element, volume_index in enumerate(array.volume_indices, start=1):
        paths = VolumePaths(spec.output_dir, volume_index)
        cases.append(f"    {element}) VOLUME_INDEX={volume_index} LOG_OUT={q(str(paths.log_out))} LOG_ERR={q(str(paths.log_err))} ;;")
    element = f"${{{element_variable}:-}}"
    command = shlex.join(spec.volume_argv("VOLUME_INDEX_PLACEHOLDER")).replace("VOLUME_INDEX_PLACEHOLDER", '"$VOLUME_INDEX"')
    return "\n".join([
        "#!/bin/sh",
        f"# {spec.name}: {array.size} volumes of {spec.output_dir}",
        f"# array element {element_variable} (1..{array.size}) -> volume index",
        f'case "{element}" in',
        *cases,
        f'    *) echo "error: array element \'{element}\' is not one of 1..{array.size} of this job" >&2; exit 2 ;;',
        "esac",
        f"cd {q(str(spec.workdir))} || exit 1",
        f'echo "=== $(date -u +%Y-%m-%dT%H:%M:%SZ) job {job_id_expression} on $(uname -n): volume $VOLUME_INDEX" >> "$LOG_OUT"',
        f'{command} < /dev/null >> "$LOG_OUT" 2>> "$LOG_ERR"',
        "status=$?",
        'echo "=== exit status $status" >> "$LOG_OUT"',
        "exit $status",
        "",
    ])


# ----------------------------------------------------------------------------- command-line options


def add_scheduler_arguments(parser: argparse.ArgumentParser) -> None:
    """Resource and scheduler options. Defaults are applied in resources_from_args, so that
    the options a user gave explicitly are known (the local backend refuses cluster-only ones)."""
    group = parser.add_argument_group("scheduler and resources")
    group.add_argument("--scheduler", choices=sorted(SCHEDULERS), default=None,
                       help="lsf, slurm or local (default: lsf if bsub is on PATH, else slurm if sbatch is, else local)")
    group.add_argument("--num-processors", type=int, default=None, help=f"CPUs per volume (default {DEFAULT_NUM_PROCESSORS})")
    group.add_argument("--memory-gb", default=None, help=f"memory per volume in GB, e.g. 64 or 0.5 (default {DEFAULT_MEMORY_GB:g})")
    group.add_argument("--walltime", default=None, help=f"time limit per volume, [hours:]minutes (default {DEFAULT_WALLTIME} = two hours)")
    group.add_argument("--queue", default=None, help="LSF queue (-q) or SLURM partition (--partition)")
    group.add_argument("--project", default=None, help="LSF project (-P) or SLURM account (--account)")
    group.add_argument("--no-gpu", action="store_true", help="request no GPU (a GPU per volume by default)")
    group.add_argument("--gpu", type=_true_or_false, default=None, metavar="{true,false}",
                       help="'--gpu false' is --no-gpu (the spelling of the original README)")
    group.add_argument("--gpu-memory-gb", type=float, default=None, help="GPU memory per volume (LSF -gpu gmem)")
    group.add_argument("--max-concurrent", type=int, default=None,
                       help="most volumes running at once (array throttle; local default: one per GPU, or one on CPU)")
    group.add_argument("--scheduler-args", default="",
                       help="extra bsub/sbatch arguments, passed verbatim; write --scheduler-args='--qos=high'")
    group.add_argument("--max-array-size", type=int, default=DEFAULT_MAX_ARRAY_SIZE,
                       help="split longer index lists into several arrays (default %(default)s, the usual cluster limit)")
    group.add_argument("--job-name", default=DEFAULT_JOB_NAME, help="job (array) name (default %(default)s)")


def _true_or_false(text: str) -> bool:
    if text.lower() in ("true", "yes", "1"):
        return True
    if text.lower() in ("false", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not true or false")


def resources_from_args(args: argparse.Namespace) -> Resources:
    """Validated resources, with the defaults applied and the explicitly given options named."""
    given = {name for name in ("num_processors", "memory_gb", "walltime", "queue", "project", "gpu_memory_gb", "max_concurrent")
             if getattr(args, name) is not None}
    given |= {"scheduler_args"} if args.scheduler_args else set()
    try:
        scheduler_args = tuple(shlex.split(args.scheduler_args))
    except ValueError as e:
        raise SchedulerError(f"--scheduler-args {args.scheduler_args!r} cannot be split into arguments ({e}); check its quotes") from None
    return Resources(
        num_processors=DEFAULT_NUM_PROCESSORS if args.num_processors is None else args.num_processors,
        memory_gb=parse_memory_gb(args.memory_gb if args.memory_gb is not None else str(DEFAULT_MEMORY_GB)),
        walltime_minutes=parse_walltime(args.walltime or DEFAULT_WALLTIME),
        gpu=not args.no_gpu and args.gpu is not False,
        gpu_memory_gb=args.gpu_memory_gb,
        queue=args.queue,
        project=args.project,
        max_concurrent=args.max_concurrent,
        scheduler_args=scheduler_args,
        explicit=frozenset(given),
    )


# ----------------------------------------------------------------------------- backends


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

    def check_resources(self, resources: Resources) -> None:
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
        argv += ["-o", str(logs / f"{array.spec.name}_%J_%I.out"), "-e", str(logs / f"{array.spec.name}_%J_%I.err")]
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


class SlurmScheduler(Scheduler):
    name = "slurm"
    executable = "sbatch"
    element_variable = "SLURM_ARRAY_TASK_ID"
    job_id_expression = "${SLURM_ARRAY_JOB_ID:-}_${SLURM_ARRAY_TASK_ID:-}"

    def check_resources(self, resources: Resources) -> None:
        if resources.gpu_memory_gb is not None:
            raise SchedulerError(
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
        argv += [f"--output={logs / f'{array.spec.name}_%A_%a.out'}", f"--error={logs / f'{array.spec.name}_%A_%a.err'}"]
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


@dataclass
class ElementResult:
    volume_index: int
    returncode: int | None  # None: killed at the walltime
    seconds: float
    last_error_line: str = ""


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
            raise SchedulerError(
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
        volume_index = rendered.array.volume_indices[element - 1]
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
            return ElementResult(volume_index, -signal.SIGTERM, 0.0, "not started: interrupted")
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
        return ElementResult(volume_index, returncode, time.monotonic() - started, last_line(VolumePaths(rendered.array.spec.output_dir, volume_index).log_err))


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


SCHEDULERS: dict[str, type[Scheduler]] = {"lsf": LsfScheduler, "slurm": SlurmScheduler, "local": LocalScheduler}


def choose_scheduler(name: str | None) -> tuple[Scheduler, str]:
    """The named backend, or whichever of bsub / sbatch is on PATH, else local; with the reason."""
    if name:
        return SCHEDULERS[name](), "chosen with --scheduler"
    for candidate in (LsfScheduler, SlurmScheduler):
        if shutil.which(candidate.executable):
            return candidate(), f"{candidate.executable} found on PATH"
    return LocalScheduler(), "neither bsub nor sbatch on PATH"
