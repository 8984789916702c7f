"""What every array element asks of the scheduler (`Resources`), parsed and checked from the
submission's command-line options."""

from __future__ import annotations

import argparse
import math
import re
import shlex
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from dinov3_cache.cluster.jobs import DEFAULT_JOB_NAME, check_script_text
from dinov3_cache.errors import UsageError

DEFAULT_NUM_PROCESSORS = 16
DEFAULT_MEMORY_GB = 64.0
DEFAULT_WALLTIME = "2:00"
SCHEDULER_NAME_RE = re.compile(r"[A-Za-z0-9_.,:@+-]+")  # queues, partitions, projects, accounts (a,b: a SLURM list)
DEFAULT_MAX_ARRAY_SIZE = 1000  # LSF's MAX_JOB_ARRAY_SIZE and SLURM's MaxArraySize default to about this


class ResourceError(UsageError):
    """A resource request that is malformed, or that the chosen backend cannot honour."""


def parse_walltime(text: str) -> int:
    """LSF's `-W` form, [hours:]minutes ('2:00' is two hours, '90' ninety minutes), as minutes."""
    match = re.fullmatch(r"(?:(\d+):)?(\d+)", text.strip())
    if not match or (match.group(1) is not None and int(match.group(2)) >= 60):
        raise ResourceError(f"--walltime {text!r} is not [hours:]minutes; write e.g. 2:00 for two hours or 90 for 90 minutes")
    minutes = int(match.group(1) or 0) * 60 + int(match.group(2))
    if minutes <= 0:
        raise ResourceError(f"--walltime {text!r} is zero; give a positive time such as 0:30")
    return minutes


def parse_memory_gb(text: str) -> float:
    """Gigabytes, optionally with a G/GB suffix (or M/MB for megabytes)."""
    match = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)\s*(G|GB|M|MB)?", text.strip(), re.IGNORECASE)
    if not match:
        raise ResourceError(f"--memory-gb {text!r} is not a memory size; give gigabytes, e.g. 64 or 0.5 (or 512M)")
    value = float(match.group(1)) / (1024 if (match.group(2) or "G").upper().startswith("M") else 1)
    if value <= 0:
        raise ResourceError(f"--memory-gb {text!r} must be positive")
    return value



@dataclass(frozen=True)
class Resources:
    """What every array element asks of the scheduler. `explicit` names the options the user gave."""

    num_processors: int = DEFAULT_NUM_PROCESSORS
    memory_gb: float = DEFAULT_MEMORY_GB
    walltime_minutes: int = parse_walltime(DEFAULT_WALLTIME)
    gpu: bool = True
    gpu_memory_gb: float | None = None
    queue: str | None = None
    project: str | None = None
    max_concurrent: int | None = None
    scheduler_args: tuple[str, ...] = ()
    explicit: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if self.num_processors < 1:
            raise ResourceError(f"--num-processors must be at least 1, got {self.num_processors}")
        if self.max_concurrent is not None and self.max_concurrent < 1:
            raise ResourceError(f"--max-concurrent must be at least 1, got {self.max_concurrent}")
        if self.gpu_memory_gb is not None and self.gpu_memory_gb <= 0:
            raise ResourceError(f"--gpu-memory-gb must be positive, got {self.gpu_memory_gb}")
        for option, value in (("--queue", self.queue), ("--project", self.project)):
            if value is not None and not SCHEDULER_NAME_RE.fullmatch(value):
                raise ResourceError(f"{option} {value!r} is not a queue, partition, project or account name: "
                                    "use letters, digits and _ . , : @ + -")
        for argument in self.scheduler_args:
            check_script_text(argument, "--scheduler-args")

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


def add_scheduler_arguments(parser: argparse.ArgumentParser, scheduler_names: Sequence[str]) -> None:
    """Resource and scheduler options. Defaults are applied in resources_from_args, so that
    the options a user gave explicitly are known (the local backend refuses cluster-only ones)."""
    group = parser.add_argument_group("scheduler and resources")
    group.add_argument("--scheduler", choices=scheduler_names, default=None,
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
        raise ResourceError(f"--scheduler-args {args.scheduler_args!r} cannot be split into arguments ({e}); check its quotes") from None
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
