"""The job as data: what every array element runs (`JobSpec`), the volume indices of one job
array (`ArrayJob`), the exact submission (`RenderedArray`) and the POSIX sh script that maps an
array element to its volume index (`job_script`).

Array elements are numbered 1..n (LSF's array indices start at 1), and the job script maps
element k to its volume indices explicitly (one, or `volumes_per_job` of them run by one
process), so volume indices need not fit the scheduler's array index range. Every element
writes its output to logs/volume_XXXXXX.out|.err of its first volume (`layout.VolumePaths`);
each volume keeps its own status record.
"""

from __future__ import annotations

import re
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from dinov3_cache.errors import UsageError
from dinov3_cache.indices import format_ranges
from dinov3_cache.paths import VolumePaths

DEFAULT_JOB_NAME = "dinov3_preprocess"
REPO_ROOT = Path(__file__).resolve().parents[2]  # where the top-level scripts live


# a job name reaches scheduler command lines, job scripts and log file names: no shell, LSF
# ([ ] %) or SLURM (%) syntax in it
JOB_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}")


def check_job_name(name: str) -> str:
    if not JOB_NAME_RE.fullmatch(name):
        raise UsageError(f"--job-name {name!r} is not a job name: use at most 128 letters, digits and _ . + -, "
                         "starting with a letter or digit")
    return name


def check_script_text(text: str, what: str) -> str:
    """A value written into a job script or a scheduler command line (quoted there) may hold
    spaces and shell syntax, but no newline or other control character: those would end a
    line of the script or of the scheduler's directives."""
    if not text.isprintable():  # spaces are printable; newlines, tabs and escapes are not
        raise UsageError(f"{what} {text!r} contains a newline or another control character; choose one without")
    return text


def array_ranges(indices) -> str:
    """[1, 2, 3, 7] -> '1-3,7': the array index syntax LSF and SLURM share."""
    return format_ranges(indices, separator=",")


@dataclass(frozen=True)
class JobSpec:
    """What each array element runs: `command` followed by `--volume-index N [M ...]`."""

    name: str
    output_dir: Path
    command: tuple[str, ...]
    workdir: Path

    def __post_init__(self) -> None:
        check_job_name(self.name)
        check_script_text(str(self.output_dir), "--output-dir")
        check_script_text(str(self.workdir), "the working directory")
        for part in self.command:
            check_script_text(part, "the job command's argument")

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
    """One job array: element k (1-based) processes the k-th group of `volumes_per_job`
    consecutive entries of volume_indices, in one process."""

    spec: JobSpec
    volume_indices: tuple[int, ...]
    volumes_per_job: int = 1

    @property
    def elements(self) -> list[tuple[int, ...]]:
        k = self.volumes_per_job
        return [self.volume_indices[i : i + k] for i in range(0, len(self.volume_indices), k)]

    @property
    def size(self) -> int:
        """Array elements (jobs), not volumes."""
        return len(self.elements)


def split_arrays(
    spec: JobSpec, indices: Sequence[int], max_array_size: int | None, volumes_per_job: int = 1
) -> list[ArrayJob]:
    """Consecutive slices of at most max_array_size elements (None: no limit) of volumes_per_job
    volumes each: one job array per slice."""
    if volumes_per_job < 1:
        raise UsageError(f"--volumes-per-job must be at least 1, got {volumes_per_job}")
    if max_array_size is None:
        max_array_size = max(1, len(indices))
    if max_array_size < 1:
        raise UsageError(f"--max-array-size must be at least 1, got {max_array_size}")
    per_array = max_array_size * volumes_per_job
    return [ArrayJob(spec, tuple(indices[i : i + per_array]), volumes_per_job) for i in range(0, len(indices), per_array)]


@dataclass
class RenderedArray:
    """The exact submission: `argv` (empty for local) receives `script` on standard input."""

    array: ArrayJob
    argv: list[str]
    script: str
    job_id: str | None = None

    def printable(self) -> str:
        command = shlex.join(self.argv) + " < job-script" if self.argv else "(run on this machine)"
        jobs = f" in {self.array.size} jobs" if self.array.volumes_per_job > 1 else ""
        return (f"# array of {len(self.array.volume_indices)} volumes{jobs}: {array_ranges(self.array.volume_indices)}\n"
                f"{command}\n# job-script:\n{self.script}")

    def to_record(self) -> dict:
        return {"job_id": self.job_id, "indices": list(self.array.volume_indices), "volumes_per_job": self.array.volumes_per_job,
                "submit_command": self.argv, "script": self.script}


def job_script(array: ArrayJob, element_variable: str, job_id_expression: str) -> str:
    """A POSIX sh script that maps its array element to its volume indices, then runs them in
    one process with its output appended to the first volume's log files."""
    spec, q = array.spec, shlex.quote
    cases = []
    for element, volume_indices in enumerate(array.elements, start=1):
        paths = VolumePaths(spec.output_dir, volume_indices[0])
        indices = " ".join(map(str, volume_indices))
        cases.append(f"    {element}) VOLUME_INDEX={q(indices)} LOG_OUT={q(str(paths.log_out))} LOG_ERR={q(str(paths.log_err))} ;;")
    element = f"${{{element_variable}:-}}"
    # unquoted on purpose: several indices become several arguments (they are digits only)
    command = shlex.join(spec.volume_argv("VOLUME_INDEX_PLACEHOLDER")).replace("VOLUME_INDEX_PLACEHOLDER", "$VOLUME_INDEX")
    per_job = f", {array.volumes_per_job} per job" if array.volumes_per_job > 1 else ""
    return "\n".join([
        "#!/bin/sh",
        f"# {spec.name}: {len(array.volume_indices)} volumes of {spec.output_dir}{per_job}",
        f"# array element {element_variable} (1..{array.size}) -> volume indices",
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
