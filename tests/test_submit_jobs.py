"""submit_preprocessing_jobs.py: a real SLURM cluster, LSF's documented syntax, local processes, bad input."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from conftest import REPO, TINY_GEOMETRY_ARGS, run_script

from dinov3_cache.cluster.base import scheduler_logs_dir
from dinov3_cache.cluster.jobs import JobSpec, split_arrays
from dinov3_cache.cluster.lsf import LsfScheduler
from dinov3_cache.cluster.resources import Resources, parse_walltime
from dinov3_cache.cluster.slurm import SlurmScheduler
from dinov3_cache.cluster.submissions import read_submission_records
from dinov3_cache.commit_protocol import is_volume_complete
from dinov3_cache.locks import VolumeLock
from dinov3_cache.paths import VolumePaths
from dinov3_cache.records import read_json, read_status, write_json_atomic

SUBMIT = "submit_preprocessing_jobs.py"
START_SLURM = REPO / "tests" / "slurm" / "start_slurm.sh"
STOP_SLURM = REPO / "tests" / "slurm" / "stop_slurm.sh"
# small requests that fit the 2-core test node; no GPU there
SMALL_JOB = ["--no-gpu", "--num-processors", "1", "--memory-gb", "2", "--walltime", "10"]
# the default model is a hub id that is not cached here: the model check would refuse it
DEMO = ["--source", "synthetic", "--model-id", "random:tiny"]


def extraction_args(output_dir: Path, model_dir: Path) -> list[str]:
    return ["--output-dir", str(output_dir), "--source", "synthetic", "--model-id", str(model_dir), *TINY_GEOMETRY_ARGS]


def only_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line, got:\n{text}"
    assert "Traceback" not in text
    return lines[0]


# ----------------------------------------------------------------------------- SLURM, for real


@pytest.fixture(scope="module")
def slurm_cluster():
    """The single-node cluster of tests/slurm/start_slurm.sh; stopped again if this fixture started it."""
    if shutil.which("sbatch") is None:
        pytest.skip("SLURM is not installed (sbatch not on PATH); .ci/run installs slurm-wlm and munge")
    started = subprocess.run([str(START_SLURM)], capture_output=True, text=True, timeout=180)
    assert started.returncode == 0, f"start_slurm.sh failed:\n{started.stdout}\n{started.stderr}"
    yield
    if "already up" not in started.stdout:
        subprocess.run([str(STOP_SLURM)], capture_output=True, timeout=60)


def submitted_job_ids(stdout: str) -> list[str]:
    return re.findall(r"^submitted (\S+):", stdout, re.MULTILINE)


def wait_for_slurm_jobs(job_ids: list[str], timeout: float = 150) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        squeue = subprocess.run(["squeue", "-h", "-j", ",".join(job_ids)], capture_output=True, text=True)
        queued = squeue.stdout
        finished = squeue.returncode == 0 and not queued.strip()
        if finished or "Invalid job id" in squeue.stderr:  # other squeue errors (a busy controller) say nothing
            return
        time.sleep(1)
    subprocess.run(["scancel", *job_ids])
    raise AssertionError(f"SLURM jobs {job_ids} still queued after {timeout} s:\n{queued}")


def test_slurm_array_runs_every_volume_and_missing_only_resubmits_the_failed_one(slurm_cluster, tmp_path, tiny_model_dir):
    out = tmp_path / "cache"
    args = [*extraction_args(out, tiny_model_dir), "--scheduler", "slurm", *SMALL_JOB]
    # Volume 1 fails honestly: this test holds its lock, as a second run of the same index would,
    # so its job exits 3 ("being processed by another run") and writes nothing.
    with VolumeLock(VolumePaths(out, 1)):
        first = run_script(SUBMIT, "--num-volumes", "3", *args, check=True)
        (job,) = submitted_job_ids(first.stdout)
        assert f"watch: squeue -j {job}" in first.stdout
        wait_for_slurm_jobs([job])

    assert [is_volume_complete(out, i) for i in range(3)] == [True, False, True]
    for element, index in ((1, 0), (3, 2)):  # array element k ran volume index k - 1
        assert read_status(VolumePaths(out, index))["job_id"] == f"{job}_{element}"
        assert f"job {job}_{element} on" in VolumePaths(out, index).log_out.read_text()
        assert (scheduler_logs_dir(out) / f"dinov3_preprocess_{job}_{element}.out").exists()
    failed = VolumePaths(out, 1)
    assert "=== exit status 3" in failed.log_out.read_text()
    assert "being processed by another run" in failed.log_err.read_text()

    (record,) = read_submission_records(out)
    assert record["indices"] == [0, 1, 2] and record["scheduler"] == "slurm" and record["job_ids"] == [job]
    assert record["options"]["model_id"] == str(tiny_model_dir) and record["options"]["no_gpu"] is True
    assert "--array=1-3" in record["arrays"][0]["submit_command"]
    # the settings were written once; every job read them from that file
    settings = read_json(Path(record["settings_file"]))
    assert settings["format"] == "dinov3_cache.extraction_settings" and settings["settings"]["model_id"] == str(tiny_model_dir)
    assert record["job_command"][2:4] == ["--settings", record["settings_file"]]

    second = run_script(SUBMIT, "--num-volumes", "3", "--missing-only", *args, check=True)
    assert "missing-only: 1 of 3 volumes have no complete volume: 1" in second.stdout
    (job2,) = submitted_job_ids(second.stdout)
    wait_for_slurm_jobs([job2])
    assert all(is_volume_complete(out, i) for i in range(3))
    assert read_status(failed)["job_id"] == f"{job2}_1"
    assert failed.log_out.read_text().count("=== exit status") == 2  # both attempts kept, appended
    records = read_submission_records(out)
    assert len(records) == 2 and records[1]["indices"] == [1]
    assert "--array=1-1" in records[1]["arrays"][0]["submit_command"]


# ----------------------------------------------------------------------------- rendering


def lsf_render(tmp_path: Path, indices, **resources) -> list:
    spec = JobSpec("dinov3_preprocess", tmp_path / "out", ("python", "preprocess_volume.py", "--output-dir", str(tmp_path / "out")), tmp_path)
    return [LsfScheduler().render(a, Resources(**resources)) for a in split_arrays(spec, indices, 1000)]


def flags(argv: list[str]) -> dict[str, str]:
    """bsub's options as flag -> value (every bsub option used here takes one value)."""
    assert argv[0] == "bsub" and len(argv) % 2 == 1
    return dict(zip(argv[1::2], argv[2::2]))


def test_lsf_bsub_line_follows_lsf_syntax_flag_by_flag(tmp_path):
    (rendered,) = lsf_render(
        tmp_path, [5, 7, 8], num_processors=4, memory_gb=0.5, walltime_minutes=90, gpu=True, gpu_memory_gb=12,
        queue="gpu_h100", project="cellmap", max_concurrent=2, scheduler_args=("-app", "dinov3"),
    )
    f = flags(rendered.argv)
    # -J "name[indexList]%job_slot_limit": indices start at 1, one element per volume
    assert f["-J"] == "dinov3_preprocess[1-3]%2"
    assert f["-n"] == "4"
    # one host for every slot; memory reserved and limited with explicit units (not LSF_UNIT_FOR_LIMITS')
    assert f["-R"] == "span[hosts=1] rusage[mem=512MB]"
    assert f["-M"] == "512MB"
    assert f["-W"] == "1:30"  # [hour:]minute
    assert f["-gpu"] == "num=1:gmem=12288M"
    assert f["-q"] == "gpu_h100" and f["-P"] == "cellmap"
    logs = scheduler_logs_dir(tmp_path / "out")
    assert f["-o"] == str(logs / "dinov3_preprocess_%J_%I.out") and f["-e"] == str(logs / "dinov3_preprocess_%J_%I.err")
    assert f["-app"] == "dinov3"  # --scheduler-args, verbatim, last
    assert set(f) == {"-J", "-n", "-R", "-M", "-W", "-gpu", "-q", "-P", "-o", "-e", "-app"}

    (no_gpu,) = lsf_render(tmp_path, [0], gpu=False)
    g = flags(no_gpu.argv)
    assert "-gpu" not in g and "-q" not in g and "-P" not in g
    assert g["-J"] == "dinov3_preprocess[1-1]" and g["-W"] == "2:00" and g["-M"] == "65536MB" and g["-n"] == "16"


def test_slurm_sbatch_line_spells_hours_and_megabytes(tmp_path):
    spec = JobSpec("dinov3_preprocess", tmp_path, ("python", "x.py"), tmp_path)
    (array,) = split_arrays(spec, [3, 4], 1000)
    argv = SlurmScheduler().render(array, Resources(walltime_minutes=parse_walltime("2:00"), memory_gb=1.5, num_processors=8,
                                                    queue="gpu", project="lab", max_concurrent=1)).argv
    assert argv[:2] == ["sbatch", "--parsable"]
    for flag in ("--array=1-2%1", "--cpus-per-task=8", "--mem=1536M", "--time=2:00:00", "--gres=gpu:1",
                 "--partition=gpu", "--account=lab", "--job-name=dinov3_preprocess"):
        assert flag in argv
    assert "--gres=gpu:1" not in SlurmScheduler().render(array, Resources(gpu=False)).argv


def test_lsf_job_script_maps_lsb_jobindex_to_the_volume(tmp_path, tiny_model_dir):
    """Run the rendered script as LSF would: LSB_JOBINDEX=2 of indices [5, 7, 8] is volume 7."""
    out = tmp_path / "cache"
    result = run_script(SUBMIT, "--indices", "5", "7-8", "--scheduler", "lsf", "--dry-run", *extraction_args(out, tiny_model_dir), *SMALL_JOB)
    assert result.returncode == 0, result.stderr
    script = result.stdout.split("# job-script:\n", 1)[1].split("\ndry run:", 1)[0]
    script_file = tmp_path / "job.sh"
    script_file.write_text(script)
    # a real submission writes the settings file the dry run prints; do it here, as submit would
    settings_path = Path(re.search(r"^# settings file (\S+) \(written at submission\):", result.stdout, re.MULTILINE).group(1))
    write_json_atomic(settings_path, dry_run_settings(result.stdout))

    env = {**os.environ, "LSB_JOBID": "777", "LSB_JOBINDEX": "2"}
    ran = subprocess.run(["/bin/sh", str(script_file)], env=env, capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, VolumePaths(out, 7).log_err.read_text()
    assert [is_volume_complete(out, i) for i in (5, 7, 8)] == [False, True, False]
    assert read_status(VolumePaths(out, 7))["job_id"] == "777[2]"
    assert "job 777[2] on" in VolumePaths(out, 7).log_out.read_text()

    for bad in ("0", "4", ""):  # outside 1..3: refused, nothing run
        env["LSB_JOBINDEX"] = bad
        refused = subprocess.run(["/bin/sh", str(script_file)], env=env, capture_output=True, text=True)
        assert refused.returncode == 2 and f"array element '{bad}' is not one of 1..3" in refused.stderr
    assert sorted(p.name for p in out.glob("volume_*_metadata.json")) == ["volume_000007_metadata.json"]


def test_dry_run_prints_and_creates_nothing(tmp_path):
    out = tmp_path / "never"
    for scheduler in ("lsf", "slurm", "local"):
        result = run_script(SUBMIT, "--num-volumes", "4", "--scheduler", scheduler, "--dry-run", "--output-dir", out, *DEMO)
        assert result.returncode == 0, result.stderr
        assert "nothing submitted or created" in result.stdout
        assert "preprocess_volume.py --settings " in result.stdout and '"source": "synthetic"' in result.stdout
    assert not out.exists()
    lsf = run_script(SUBMIT, "--num-volumes", "4", "--scheduler", "lsf", "--dry-run", "--output-dir", out, *DEMO).stdout
    assert "bsub -J 'dinov3_preprocess[1-4]'" in lsf and "-gpu num=1" in lsf  # a GPU by default
    seed_spelling = run_script(SUBMIT, "--num-volumes", "4", "--scheduler", "lsf", "--dry-run", "--output-dir", out, *DEMO, "--gpu", "False").stdout
    assert "bsub -J" in seed_spelling and "-gpu" not in seed_spelling
    assert not out.exists()


@pytest.mark.parametrize("extra, message", [
    (["--source", "synthetic", "--chunks", "1,2"], "--chunks needs 4 positive integers"),
    ([], "no data source given"),
    (["--source", "synthetic", "--base-resolution", "100"], "must be a whole multiple"),
])
def test_bad_extraction_options_are_refused_before_submitting(tmp_path, extra, message):
    result = run_script(SUBMIT, "--num-volumes", "2", "--scheduler", "local", "--output-dir", tmp_path / "o", "--model-id", "random:tiny", *extra)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "o").exists()


def test_arrays_over_the_size_limit_are_split_not_rejected(tmp_path):
    result = run_script(SUBMIT, "--indices", "0-2500", "--scheduler", "slurm", "--dry-run", "--output-dir", tmp_path / "o", *DEMO)
    assert result.returncode == 0, result.stderr
    assert "2501 volumes exceed the array size limit of 1000: split into 3 arrays" in result.stdout
    assert re.findall(r"--array=(\S+)", result.stdout) == ["1-1000", "1-1000", "1-501"]
    third_script = result.stdout.split("# job-script:\n")[3]
    assert re.search(r"^\s+1\) VOLUME_INDEX=2000 ", third_script, re.MULTILINE)
    assert re.search(r"^\s+501\) VOLUME_INDEX=2500 ", third_script, re.MULTILINE)

    lsf = run_script(SUBMIT, "--indices", "0-4", "--scheduler", "lsf", "--dry-run", "--max-array-size", "2", "--max-concurrent", "1", "--output-dir", tmp_path / "o", *DEMO)
    assert re.findall(r"-J '(\S+)'", lsf.stdout) == ["dinov3_preprocess[1-2]%1"] * 2 + ["dinov3_preprocess[1-1]%1"]


# ----------------------------------------------------------------------------- local processes


def test_local_runs_volumes_concurrently_reports_a_failure_then_missing_only_finishes(tmp_path, tiny_model_dir):
    out = tmp_path / "cache"
    args = [*extraction_args(out, tiny_model_dir), "--scheduler", "local", "--max-concurrent", "2", "--no-gpu"]
    with VolumeLock(VolumePaths(out, 1)):  # volume 1 is "being processed elsewhere": its run exits 3
        result = run_script(SUBMIT, "--num-volumes", "3", *args)
    assert result.returncode == 0, result.stdout + result.stderr  # held by another live run is not a failure
    assert "running 3 volumes here, 2 at a time (no GPU)" in result.stdout
    assert re.search(r"^volume 1: held by another live run", result.stdout, re.MULTILINE)
    assert len(re.findall(r"^volume [02]: completed in [0-9.]+ s$", result.stdout, re.MULTILINE)) == 2
    assert "summary: 2 completed, 0 skipped (already complete), 0 failed; 1 held by another run" in result.stdout
    assert [is_volume_complete(out, i) for i in range(3)] == [True, False, True]
    # volumes 0 and 2 ran at the same time: each one's run started before the other's finished
    s0, s2 = read_status(VolumePaths(out, 0)), read_status(VolumePaths(out, 2))
    assert s0["pid"] != s2["pid"]
    assert s0["started"] <= s2["finished"] and s2["started"] <= s0["finished"]

    again = run_script(SUBMIT, "--num-volumes", "3", "--missing-only", *args)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "missing-only: 1 of 3 volumes have no complete volume: 1" in again.stdout
    assert "summary: 1 completed, 0 skipped (already complete), 0 failed" in again.stdout
    assert all(is_volume_complete(out, i) for i in range(3))
    assert [r["indices"] for r in read_submission_records(out)] == [[0, 1, 2], [1]]

    rerun = run_script(SUBMIT, "--indices", "0-1", *args)  # complete volumes are skipped, and counted as such
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert sorted(re.findall(r"^volume (\d): skipped, already complete", rerun.stdout, re.MULTILINE)) == ["0", "1"]
    assert "summary: 0 completed, 2 skipped (already complete), 0 failed" in rerun.stdout


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--walltime", "2h"], "--walltime '2h' is not [hours:]minutes"),
        (["--walltime", "1:75"], "--walltime '1:75' is not [hours:]minutes"),
        (["--indices", "5-x"], "--indices: '5-x' is not an index or a range A-B"),
        (["--indices", "9-3"], "--indices: range '9-3' runs backwards"),
        (["--memory-gb", "64X"], "--memory-gb '64X' is not a memory size"),
        (["--memory-gb", "0"], "--memory-gb '0' must be positive"),
        (["--scheduler", "slurm", "--gpu-memory-gb", "40"], "--gpu-memory-gb has no SLURM equivalent"),
        (["--scheduler", "local", "--queue", "gpu"], "--queue applies only to LSF and SLURM"),
        (["--scheduler", "lsf"], "bsub not found on PATH"),
        (["--scheduler", "slurm", "--max-array-size", "0"], "--max-array-size must be at least 1"),
    ],
)
def test_bad_input_is_one_clear_line(tmp_path, extra, expected):
    if "--indices" not in extra:
        extra = ["--num-volumes", "3", *extra]
    if "bsub" in expected and shutil.which("bsub"):
        pytest.skip("bsub is installed here")
    out = tmp_path / "out"
    result = run_script(SUBMIT, "--output-dir", out, *DEMO, *extra)
    assert result.returncode == 2
    assert expected in only_line(result.stderr)
    assert not out.exists()


def test_argparse_errors_are_one_line_too(tmp_path):
    result = run_script(SUBMIT, "--output-dir", tmp_path, "--num-volumes", "3", "--indices", "4")
    assert result.returncode == 2
    assert "not allowed with argument" in only_line(result.stderr)


def dry_run_settings(stdout: str) -> dict:
    """The settings document a dry run prints (the file a real submission writes)."""
    text = stdout.split("(written at submission):\n", 1)[1].split("\n# array of", 1)[0]
    return json.loads(text)


def test_extraction_options_reach_every_job_through_one_settings_file(tmp_path):
    options = ["--organelles", "cell", "nuc", "--inference-filter", "jrc_a", "jrc_b", "--compression", "zstd",
               "--zarr-format", "3", "--save-raw", "--planes", "xy", "--features-dtype", "float32", "--batch-size", "3"]
    result = run_script(SUBMIT, "--num-volumes", "1", "--scheduler", "slurm", "--dry-run", "--output-dir", tmp_path, *DEMO, *options)
    assert result.returncode == 0, result.stderr
    settings = dry_run_settings(result.stdout)["settings"]
    assert settings["organelles"] == ["cell", "nuc"] and settings["inference_filter"] == ["jrc_a", "jrc_b"]
    assert settings["compression"] == "zstd" and settings["zarr_format"] == 3 and settings["save_raw"] is True
    assert settings["planes"] == ["xy"] and settings["features_dtype"] == "float32" and settings["batch_size"] == 3
    assert settings["output_dir"] == str(tmp_path.absolute()) and settings["source"] == "synthetic"
    job_line = next(line for line in result.stdout.splitlines() if "preprocess_volume.py" in line)
    job_argv = shlex.split(job_line.split(" < /dev/null")[0])
    # the job's command line is the settings file and the volume index, nothing else
    assert job_argv[1].endswith("preprocess_volume.py") and job_argv[2] == "--settings"
    assert re.fullmatch(r".*/logs/submissions/settings_\S+\.json", job_argv[3])
    assert job_argv[4:] == ["--volume-index", "$VOLUME_INDEX"]


# ----------------------------------------------------------------------------- golden files


GOLDEN = REPO / "tests" / "golden"


def golden_spec() -> JobSpec:
    """A fixed job: no path of this machine in it, so the rendering is the same everywhere."""
    command = ("/opt/venv/bin/python", "/opt/dinov3/preprocess_volume.py", "--settings", "/cache/logs/submissions/settings_S.json")
    return JobSpec("dinov3_preprocess", Path("/cache"), command, Path("/opt/dinov3"))


GOLDEN_RESOURCES = dict(num_processors=4, memory_gb=8, walltime_minutes=90, queue="gpu", project="lab", max_concurrent=2)


@pytest.mark.parametrize("name, scheduler, resources", [
    ("sbatch_array.txt", SlurmScheduler(), Resources(**GOLDEN_RESOURCES)),
    ("bsub_array.txt", LsfScheduler(), Resources(**GOLDEN_RESOURCES, gpu_memory_gb=40, scheduler_args=("-app", "dinov3"))),
])
def test_rendered_submission_matches_its_golden_file(name, scheduler, resources):
    """The exact submission command and job script, pinned. After a deliberate change, replace
    the golden file with the 'got' text the failure prints."""
    (array,) = split_arrays(golden_spec(), [5, 7, 8], 1000)
    got = scheduler.render(array, resources).printable() + "\n"
    assert got == (GOLDEN / name).read_text(), f"rendering changed; got:\n{got}"


@pytest.mark.parametrize("extra, message", [
    (["--organelles", "unicorn"], "unknown organelle(s) unicorn"),
    (["--output-image-dim", "17"], "not a multiple of the model's patch size 16"),
    (["--model-id", "random:huge"], "unknown random model 'random:huge'"),
    (["--model-id", "no/such-model-dir/"], "cannot read the config of model"),
    (["--model-id", "random:"], "unknown random model 'random:'; choose one of random:tiny"),
    (["--model-id", "random"], "a random demo model (random:tiny"),
    (["--model-id", "no-such-org/no-such-model"], "not in the local Hugging Face cache"),
])
def test_options_that_fail_every_job_are_refused_before_submitting(tmp_path, tiny_model_dir, extra, message):
    out = tmp_path / "o"
    args = [*extraction_args(out, tiny_model_dir), *extra]
    for scheduler in ("lsf", "local"):
        result = run_script(SUBMIT, "--num-volumes", "2", "--scheduler", scheduler, "--dry-run", *args)
        assert result.returncode == 2 and message in only_line(result.stderr), result.stderr
        assert "bsub" not in result.stdout and not out.exists()


def test_an_unloadable_hub_model_is_refused_once_naming_every_way_out(tmp_path):
    """With HF_HUB_OFFLINE only the cache counts: a hub id not in it would fail every job."""
    result = run_script(SUBMIT, "--num-volumes", "1000", "--scheduler", "local", "--output-dir", tmp_path / "o",
                        "--source", "synthetic", "--model-id", "no-such-org/no-such-model", env={"HF_HUB_OFFLINE": "1"})
    line = only_line(result.stderr)
    assert result.returncode == 2 and "HF_HUB_OFFLINE" in line and "local directory" in line and "random:tiny" in line
    assert "running" not in result.stdout and not (tmp_path / "o").exists()


def test_an_unreachable_hub_fails_fast_and_a_cached_hub_model_passes(tmp_path, tiny_model_dir):
    """Without HF_HUB_OFFLINE the hub is asked within seconds (here a closed port), then the
    cache decides; a hub id whose config is in the cache is accepted, offline or not."""
    cache = tmp_path / "hub"
    snapshot = cache / "models--some-org--some-model" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    shutil.copy(tiny_model_dir / "config.json", snapshot / "config.json")
    (cache / "models--some-org--some-model" / "refs").mkdir()
    (cache / "models--some-org--some-model" / "refs" / "main").write_text("a" * 40)
    env = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_CACHE": str(cache)}
    base = [SUBMIT, "--num-volumes", "2", "--scheduler", "lsf", "--dry-run", "--output-dir", tmp_path / "o",
            "--source", "synthetic", *TINY_GEOMETRY_ARGS, "--model-id"]
    missing = run_script(*base, "no-such-org/no-such-model", env=env, timeout=60)
    line = only_line(missing.stderr)
    assert missing.returncode == 2 and "not in the local Hugging Face cache, and the hub http://127.0.0.1:9 is unreachable" in line
    for offline in ("0", "1"):
        cached = run_script(*base, "some-org/some-model", env={**env, "HF_HUB_OFFLINE": offline}, timeout=60)
        assert cached.returncode == 0 and "bsub" in cached.stdout, cached.stderr


def test_a_model_directory_without_weights_is_refused(tmp_path, tiny_model_dir):
    model = tmp_path / "config-only"
    model.mkdir()
    shutil.copy(tiny_model_dir / "config.json", model / "config.json")
    result = run_script(SUBMIT, "--num-volumes", "1", "--scheduler", "local", "--dry-run",
                        "--output-dir", tmp_path / "o", "--source", "synthetic", "--model-id", model)
    assert result.returncode == 2 and "holds no weights" in only_line(result.stderr)


def test_a_local_model_without_a_config_is_refused(tmp_path):
    (tmp_path / "empty-model").mkdir()
    result = run_script(SUBMIT, "--num-volumes", "1", "--scheduler", "local", "--dry-run",
                        "--output-dir", tmp_path / "o", "--source", "synthetic", "--model-id", tmp_path / "empty-model")
    assert result.returncode == 2 and "cannot read the config of model" in only_line(result.stderr)


def test_complete_volumes_with_another_configuration_are_refused_with_the_way_out(tmp_path, built_cache, tiny_model_dir):
    out = tmp_path / "cache"
    shutil.copytree(built_cache, out)
    before = sorted(p.name for p in out.iterdir())
    base = [SUBMIT, "--indices", "0-3", "--scheduler", "lsf", "--dry-run", *extraction_args(out, tiny_model_dir)]
    same = run_script(*base)
    assert same.returncode == 0 and "bsub" in same.stdout  # same configuration: those jobs skip
    other = run_script(*base, "--planes", "xy")
    assert other.returncode == 2
    line = only_line(other.stderr)
    assert "3 requested volume(s) are complete with a different configuration (0, 1, 2)" in line
    assert "--overwrite" in line and "--output-dir" in line and "bsub" not in other.stdout
    assert run_script(*base, "--planes", "xy", "--overwrite").returncode == 0
    missing = run_script(*base, "--planes", "xy", "--missing-only")
    assert missing.returncode == 0 and "missing-only: 1 of 4 volumes have no complete volume: 3" in missing.stdout
    assert sorted(p.name for p in out.iterdir()) == before


def test_packed_submission_matches_its_golden_file():
    """--volumes-per-job 2: five volumes become three array elements, each one process."""
    (array,) = split_arrays(golden_spec(), [5, 7, 8, 9, 10], 1000, volumes_per_job=2)
    assert array.elements == [(5, 7), (8, 9), (10,)]
    got = SlurmScheduler().render(array, Resources(**GOLDEN_RESOURCES)).printable() + "\n"
    assert got == (GOLDEN / "sbatch_array_packed.txt").read_text(), f"rendering changed; got:\n{got}"


def test_packed_local_run_commits_every_volume_and_reruns_only_the_missing(tmp_path, tiny_model_dir):
    """Three volumes in two local processes (K = 2); removing one volume's metadata makes
    --missing-only submit just that one."""
    args = ["--scheduler", "local", "--volumes-per-job", "2", "--output-dir", str(tmp_path), "--source", "synthetic",
            "--model-id", str(tiny_model_dir), *TINY_GEOMETRY_ARGS]
    result = run_script("submit_preprocessing_jobs.py", "--indices", "0-2", *args)
    assert result.returncode == 0, result.stderr
    assert "3 volumes here in 2 process(es)" in result.stdout
    for index in range(3):
        assert VolumePaths(tmp_path, index).metadata.exists()
        assert read_json(VolumePaths(tmp_path, index).status)["state"] == "complete"
    VolumePaths(tmp_path, 1).metadata.unlink()
    again = run_script("submit_preprocessing_jobs.py", "--indices", "0-2", "--missing-only", *args)
    assert again.returncode == 0, again.stderr
    assert "missing-only: 1 of 3" in again.stdout and VolumePaths(tmp_path, 1).metadata.exists()
