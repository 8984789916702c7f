"""The job as data: what every array element runs (`JobSpec`), the volume indices of one job
array (`ArrayJob`), the exact submission (`RenderedArray`) and the POSIX sh script that maps an
array element to its volume index (`job_script`).

Array elements are numbered 1..n (LSF's array indices start at 1), and the job script maps
element k to its volume index explicitly, so volume indices need not fit the scheduler's
array index range. Every element writes its output to logs/volume_XXXXXX.out|.err
(`layout.VolumePaths`).
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from dinov3_cache.errors import UsageError
from dinov3_cache.indices import format_ranges
from dinov3_cache.layout import VolumePaths

DEFAULT_JOB_NAME = "dinov3_preprocess"
REPO_ROOT = Path(__file__).resolve().parents[2]  # where the top-level scripts live


def array_ranges(indices) -> str:
    """[1, 2, 3, 7] -> '1-3,7': the array index syntax LSF and SLURM share."""
    return format_ranges(indices, separator=",")


@dataclass(frozen=True)
class JobSpec:
    """What each array element runs: `command` followed by `--volume-index N`."""

    name: str
    output_dir: Path
    command: tuple[str, ...]
    workdir: Path

    @classmethod
    def preprocess_volume(cls, output_dir: Path, settings_file: Path, name: str = DEFAULT_JOB_NAME) -> JobSpec:
        """Run the repository's preprocess_volume.py with this interpreter and the submission's
        settings file (written once, read by every element)."""
        script = REPO_ROOT / "preprocess_volume.py"
        command = (sys.executable, str(script), "--settings", str(Path(settings_file).absolute()))
        return cls(name, Path(output_dir).absolute(), command, Path.cwd())

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
        raise UsageError(f"--max-array-size must be at least 1, got {max_array_size}")
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
