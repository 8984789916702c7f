"""dinov3_cache/cluster/jobs.py and what reaches a job script or a scheduler command line:
shell syntax in any user value is refused or quoted, never run, for local, LSF and SLURM."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest
from conftest import REPO, TINY_GEOMETRY_ARGS, call_main, run_script

from dinov3_cache.cluster.jobs import JobSpec, split_arrays
from dinov3_cache.cluster.local import LocalScheduler
from dinov3_cache.cluster.lsf import LsfScheduler
from dinov3_cache.cluster.resources import Resources
from dinov3_cache.cluster.slurm import SlurmScheduler
from dinov3_cache.commit_protocol import is_volume_complete
from dinov3_cache.errors import UsageError
from dinov3_cache.paths import VolumePaths

SUBMIT = "submit_preprocessing_jobs.py"
MARKER = "INJECTED"


def payloads(marker: Path) -> dict[str, str]:
    """Each way a value could smuggle a command into a shell line, each creating `marker`."""
    return {
        "newline": f"x\ntouch {marker}",
        "semicolon": f"x; touch {marker}",
        "command substitution": f"x$(touch {marker})",
        "backticks": f"x`touch {marker}`",
        "single quote": f"x'; touch {marker}; '",
        "double quote": f'x"; touch {marker}; "',
    }


def only_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in stderr, stderr
    return lines[0]


# ----------------------------------------------------------------------------- the command line


@pytest.mark.parametrize("option", ["--job-name", "--queue", "--project"])
@pytest.mark.parametrize("scheduler", ["lsf", "slurm"])
def test_names_with_shell_syntax_are_refused_before_anything_is_written(tmp_path, scheduler, option):
    marker = tmp_path / MARKER
    out = tmp_path / "out"
    for kind, value in payloads(marker).items():
        result = call_main("submit_preprocessing_jobs", "--num-volumes", "2", "--scheduler", scheduler, "--dry-run",
                           "--output-dir", out, "--source", "synthetic", "--model-id", "random:tiny", option, value)
        assert result.returncode == 2, kind
        assert option in only_error_line(result.stderr), kind
        assert not out.exists() and not marker.exists() and "# job-script" not in result.stdout, kind


def test_local_runs_nothing_a_job_name_smuggles_in(tmp_path):
    """The reported attack: --job-name $'x\ntouch FILE' ran `touch FILE` on this machine."""
    marker = tmp_path / MARKER
    out = tmp_path / "out"
    for kind, value in payloads(marker).items():
        args = ["--num-volumes", "1", "--scheduler", "local", "--output-dir", out, "--source", "synthetic",
                "--model-id", "random:tiny", *TINY_GEOMETRY_ARGS, "--job-name", value]
        result = run_script(SUBMIT, *args) if kind == "newline" else call_main("submit_preprocessing_jobs", *args)
        assert result.returncode == 2 and "--job-name" in only_error_line(result.stderr), kind
        assert not marker.exists() and not out.exists(), kind


def test_a_newline_in_any_path_or_scheduler_argument_is_refused(tmp_path):
    marker = tmp_path / MARKER
    cases = {
        "--output-dir": ["--output-dir", tmp_path / f"out\ntouch {marker}"],
        "--scheduler-args": ["--output-dir", tmp_path / "out", f"--scheduler-args=--comment='a\ntouch {marker}'"],
    }
    for option, args in cases.items():
        for scheduler in ("lsf", "slurm", "local"):
            result = call_main("submit_preprocessing_jobs", "--num-volumes", "1", "--scheduler", scheduler, "--dry-run",
                               "--source", "synthetic", "--model-id", "random:tiny", *args)
            assert result.returncode == 2 and option in only_error_line(result.stderr), (option, scheduler, result.stderr)
    assert not marker.exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize("option", ["--model-id", "--data-root", "--organelles"])
def test_extraction_values_with_shell_syntax_run_nothing(tmp_path, option):
    """Extraction options reach the jobs through the settings file (JSON), never a shell line;
    each of these values is refused by its own check, and nothing runs."""
    marker = tmp_path / MARKER
    for kind, value in payloads(marker).items():
        source = ["--data-root", value] if option == "--data-root" else ["--source", "synthetic", option, value]
        model = [] if option == "--model-id" else ["--model-id", "random:tiny"]
        result = call_main("submit_preprocessing_jobs", "--num-volumes", "1", "--scheduler", "local",
                           "--output-dir", tmp_path / "out", *source, *model, *TINY_GEOMETRY_ARGS)
        assert not marker.exists(), f"{option} {kind}: the injected command ran"
        assert result.returncode == 2 and only_error_line(result.stderr), (option, kind, result.stdout, result.stderr)


# ----------------------------------------------------------------------------- rendered scripts


SHELL_PATH = "cache dir; touch INJ1 $(touch INJ2) `touch INJ3` 'q' \"dq\""


def rendered_job(tmp_path: Path, scheduler, command: tuple[str, ...]):
    spec = JobSpec("dinov3_preprocess", tmp_path / SHELL_PATH, command, tmp_path)
    (array,) = split_arrays(spec, [4, 9], 1000)
    return scheduler.render(array, Resources(queue="gpu", project="lab", scheduler_args=("--comment=$(touch INJ4)",)))


@pytest.mark.parametrize("scheduler", [LsfScheduler(), SlurmScheduler(), LocalScheduler()], ids=lambda s: s.name)
def test_rendered_scripts_quote_every_path_and_run_nothing_injected(tmp_path, scheduler):
    """The job script of each backend, run as its scheduler would: the path with shell syntax
    is one argument, the logs land in it, and none of the embedded commands ran."""
    rendered = rendered_job(tmp_path, scheduler, ("/bin/echo", "ran in", str(tmp_path / SHELL_PATH)))
    VolumePaths(rendered.array.spec.output_dir, 9).logs.mkdir(parents=True)
    env = {**os.environ, scheduler.element_variable: "2"}
    ran = subprocess.run(["/bin/sh", "-s"], input=rendered.script, env=env, cwd=tmp_path, capture_output=True, text=True)
    assert ran.returncode == 0, ran.stderr
    log = VolumePaths(rendered.array.spec.output_dir, 9).log_out.read_text()
    assert f"ran in {tmp_path / SHELL_PATH} --volume-index 9" in log
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith("INJ")]
    # the printed submission is a shell line that splits back into the exact argv
    if rendered.argv:
        printed = rendered.printable().splitlines()[1].removesuffix(" < job-script")
        assert shlex.split(printed) == rendered.argv
        assert "--comment=$(touch INJ4)" in rendered.argv  # --scheduler-args stay one verbatim argument


@pytest.mark.parametrize("name", ["x\ny", "a b", "x;y", "x$(y)", "x`y`", "x'y", 'x"y', "x[1]", "x%j", "-x", ""])
def test_job_spec_refuses_a_name_outside_the_safe_set(tmp_path, name):
    with pytest.raises(UsageError, match="--job-name"):
        JobSpec(name, tmp_path, ("python",), tmp_path)


def test_job_spec_accepts_paths_with_spaces_and_shell_characters(tmp_path):
    spec = JobSpec("my_job-1.2+x", tmp_path / SHELL_PATH, ("python", "a b.py"), tmp_path / "work dir")
    assert spec.name == "my_job-1.2+x"
    with pytest.raises(UsageError, match="--output-dir"):
        JobSpec("job", tmp_path / "a\tb", ("python",), tmp_path)


def test_local_run_in_an_output_dir_with_spaces_and_shell_syntax_completes(tmp_path, tiny_model_dir):
    """A legitimate path with spaces, quotes and $( ) works end to end and runs nothing else."""
    out = tmp_path / SHELL_PATH
    result = run_script(SUBMIT, "--num-volumes", "1", "--scheduler", "local", "--no-gpu", "--output-dir", out,
                        "--source", "synthetic", "--model-id", tiny_model_dir, *TINY_GEOMETRY_ARGS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert is_volume_complete(out, 0)
    for directory in (tmp_path, REPO):  # the job runs in the submission's directory (REPO here)
        assert not [p.name for p in directory.iterdir() if p.name.startswith("INJ")]
