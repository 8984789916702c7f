"""Bad or unusual input, as a new user types it: every case is one clear error (one `error:` line
and the documented exit status for a script; one exception naming the argument for the Python
API), no traceback, nothing written."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY_GEOMETRY_ARGS, call_main, preprocess_args, run_script

from dinov3_cache.errors import EXIT_USAGE
from dinov3_cache.interrupt import EXIT_INTERRUPTED
from dinov3_cache.loader.arguments import LoaderArgumentError, cpu_count, max_threads
from dinov3_cache.paths import VolumePaths
from dinov3_cache.records import read_json, write_json_atomic
from dinov3_cache.schema import seal_metadata
from preprocessed_dataloader import CacheError, PreprocessedDINOv3Dataset, create_preprocessed_dataloader


def one_error_line(result: subprocess.CompletedProcess, status: int = EXIT_USAGE, *words: str) -> str:
    """The run exited `status` with exactly one `error:` line on stderr (holding `words`) and no traceback."""
    assert result.returncode == status, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    for word in words:
        assert word in errors[0], errors[0]
    return errors[0]


# ----------------------------------------------------------------------------- the loader's Python API


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"batch_size": "4"}, ["batch_size", "integer"]),
        ({"batch_size": 2.5}, ["batch_size", "integer"]),
        ({"batch_size": 0}, ["batch_size", "at least 1"]),
        ({"crop_size": (16.5, 16, 16)}, ["crop_size"]),
        ({"crop_size": (16, 16)}, ["crop_size"]),
        ({"volume_indices": ["0-2"]}, ["volume_indices", "'0-2'", "range"]),
        ({"volume_indices": 3}, ["volume_indices", "[3]"]),
        ({"volume_indices": []}, ["volume_indices is empty"]),
        ({"features_dtype": torch.int32}, ["features_dtype", "floating", "truncated"]),
        ({"features_dtype": "int8"}, ["features_dtype", "float32"]),
        ({"features_dtype": "fp32"}, ["features_dtype"]),
        ({"device": "tpu"}, ["device", "'tpu'", "cpu"]),
        ({"device": 3.5}, ["device"]),
        ({"num_workers": -1}, ["num_workers"]),
        ({"num_threads": "8"}, ["num_threads", "integer"]),
        ({"prefetch_batches": 1.5}, ["prefetch_batches", "integer"]),
        ({"samples_per_volume": 0}, ["samples_per_volume"]),
        ({"transform": "flip"}, ["transform", "callable"]),
    ],
)
def test_loader_arguments_are_refused_at_construction_with_one_clear_error(built_cache, options, words):
    with pytest.raises(CacheError) as raised:
        create_preprocessed_dataloader(built_cache, **{"batch_size": 1, **options})
    message = str(raised.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message
    if isinstance(raised.value, LoaderArgumentError):
        assert isinstance(raised.value, ValueError) and raised.value.exit_status == EXIT_USAGE


@pytest.mark.parametrize("path", [None, 5, "", "  "])
def test_a_path_that_is_not_a_path_is_refused(path):
    with pytest.raises(LoaderArgumentError, match="preprocessed_dir"):
        PreprocessedDINOv3Dataset(path)


def test_a_file_as_the_cache_directory_is_refused(tmp_path):
    file = tmp_path / "cache.txt"
    file.write_text("not a cache")
    with pytest.raises(LoaderArgumentError, match="is a file, not a directory"):
        PreprocessedDINOv3Dataset(file)


def test_unambiguous_arguments_are_accepted(built_cache):
    """A dtype name (the README's style) and one integer crop edge (a cube) work like their long forms."""
    named = PreprocessedDINOv3Dataset(built_cache, features_dtype="float16", gt_dtype="int32", crop_size=8)
    features, gt, _ = named[0]
    assert features.dtype == torch.float16 and gt.dtype == torch.int32
    assert named.crop_size == (8, 8, 8) and tuple(features.shape[1:]) == (8, 8, 8)
    assert PreprocessedDINOv3Dataset(built_cache, features_dtype="torch.bfloat16").features_dtype == torch.bfloat16
    assert len(PreprocessedDINOv3Dataset(built_cache, volume_indices=range(2))) == 2


@pytest.mark.parametrize("index", ["0", 1.0, slice(0, 2), None])
def test_dataset_indices_must_be_integers(built_cache, index):
    dataset = PreprocessedDINOv3Dataset(built_cache)
    with pytest.raises(LoaderArgumentError, match="dataset indices are integers") as raised:
        dataset[index]
    if isinstance(index, slice):
        assert "range" in str(raised.value)


def test_workers_beyond_the_cpu_cores_are_capped_with_a_warning(built_cache):
    with pytest.warns(UserWarning, match=f"capped at {cpu_count()}"):
        loader = create_preprocessed_dataloader(built_cache, num_workers=1000)
    assert loader.num_workers == cpu_count()
    with pytest.warns(UserWarning, match=f"capped at {max_threads()}"):
        assert PreprocessedDINOv3Dataset(built_cache, num_threads=10_000).num_threads == max_threads()


def test_a_loader_whose_batches_do_not_fit_in_memory_is_refused_before_starting_workers(built_cache, monkeypatch):
    import dinov3_cache.loader.arguments as arguments

    dataset = PreprocessedDINOv3Dataset(built_cache)
    monkeypatch.setattr(arguments, "available_memory", lambda: 2**20)  # 1 MiB free: no batch of this cache fits
    with pytest.raises(LoaderArgumentError, match=r"would need about .* GiB .* available; lower num_workers"):
        create_preprocessed_dataloader(built_cache, batch_size=3, num_workers=1)
    monkeypatch.setattr(arguments, "available_memory", lambda: 2**40)
    features, _gt, _mask = next(iter(create_preprocessed_dataloader(built_cache, batch_size=3)))
    assert features.shape[0] == 3 and arguments.sample_nbytes(dataset.volumes[0], None, torch.float32) * 3 >= features.numel() * 4


def test_metadata_claiming_larger_arrays_than_stored_names_the_disagreement(built_cache, tmp_path):
    import shutil

    cache = tmp_path / "cache"
    shutil.copytree(built_cache, cache)
    paths = VolumePaths(cache, 0)
    metadata = read_json(paths.metadata)
    real = metadata["shapes"]["features"]
    metadata["shapes"]["features"] = real[:1] + [2 * s for s in real[1:]]
    for array in ("gt", "mask"):
        if array in metadata["shapes"]:
            metadata["shapes"][array] = [2 * s for s in metadata["shapes"][array]]
    write_json_atomic(paths.metadata, seal_metadata(metadata))
    crop = [2 * s for s in real[1:]]
    with pytest.raises(CacheError) as raised:
        dataset = PreprocessedDINOv3Dataset(cache, volume_indices=[0], crop_size=crop)
        dataset[0]
    message = str(raised.value)
    assert "metadata says" in message and "on disk" in message, message


# ----------------------------------------------------------------------------- the measuring command


def test_measuring_command_refuses_a_worker_storm_and_bad_directories(built_cache, tmp_path):
    one_error_line(call_main("preprocessed_dataloader", "--preprocessed-dir", built_cache, "--num-workers", "1000"),
                   EXIT_USAGE, "--num-workers", str(cpu_count()))
    one_error_line(call_main("preprocessed_dataloader", "--preprocessed-dir", built_cache, "--num-threads", "100000"),
                   EXIT_USAGE, "--num-threads")
    one_error_line(call_main("preprocessed_dataloader", "--preprocessed-dir", ""), EXIT_USAGE, "empty")
    file = tmp_path / "file"
    file.write_text("x")
    one_error_line(call_main("preprocessed_dataloader", "--preprocessed-dir", file), EXIT_USAGE, "is a file")
    one_error_line(call_main("preprocessed_dataloader", "--preprocessed-dir", built_cache, "--device", "tpu"), EXIT_USAGE, "tpu")


def test_measuring_command_runs_on_a_tokens_cache(tmp_path, tiny_model_dir):
    call_main("preprocess_volume", *preprocess_args(tmp_path, 0, tiny_model_dir, "--layout", "tokens"), check=True)
    result = call_main("preprocessed_dataloader", "--preprocessed-dir", tmp_path, "--num-batches", "2", "--no-evict", "--num-threads", "2")
    assert result.returncode == 0, result.stderr
    assert "Warm loads (cached), 1 batches" in result.stdout


def interrupt_after(script: str, args: list[str], seconds: float) -> subprocess.CompletedProcess:
    process = subprocess.Popen([sys.executable, str(REPO / script), *map(str, args)], cwd=REPO, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(seconds)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


@pytest.mark.parametrize("script", ["preprocessed_dataloader.py", "preprocess_volume.py", "submit_preprocessing_jobs.py",
                                    "check_preprocessing.py", "probe_features.py"])
def test_ctrl_c_while_a_script_imports_torch_is_one_line_and_130(script, tmp_path):
    """SIGINT 0.3 s after start: the interpreter is up and torch is still loading (a KeyboardInterrupt
    inside a native module's initialisation would surface as an ImportError traceback)."""
    args = {"preprocessed_dataloader.py": ["--preprocessed-dir", tmp_path],
            "preprocess_volume.py": ["--volume-index", "0", "--output-dir", tmp_path / "out", "--source", "synthetic",
                                     "--model-id", "random:tiny", *TINY_GEOMETRY_ARGS],
            "submit_preprocessing_jobs.py": ["--output-dir", tmp_path / "out", "--num-volumes", "1", "--source", "synthetic",
                                             "--model-id", "random:tiny", "--scheduler", "local", "--dry-run"],
            "check_preprocessing.py": ["--output-dir", tmp_path],
            "probe_features.py": ["--cache", tmp_path]}[script]
    result = interrupt_after(script, args, 0.3)
    one_error_line(result, EXIT_INTERRUPTED, "interrupted")


def test_ctrl_c_while_measuring_is_one_line_and_130(built_cache):
    args = ["--preprocessed-dir", built_cache, "--num-batches", "100000000", "--no-evict", "--num-threads", "2"]
    process = subprocess.Popen([sys.executable, str(REPO / "preprocessed_dataloader.py"), *map(str, args)], cwd=REPO, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout.readline().startswith("Volumes:")  # measuring has started
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    one_error_line(subprocess.CompletedProcess(args, process.returncode, stdout, stderr), EXIT_INTERRUPTED, "interrupted")


def test_the_library_module_says_which_script_to_run():
    result = run_script("dinov3_preprocessing.py", "--volume-index", "0")
    one_error_line(result, EXIT_USAGE, "library module", "preprocess_volume.py")



# ----------------------------------------------------------------------------- extraction and submission


BAD_EXTRACTION_OPTIONS = [
    (["--output-image-dim", "33"], ["patch size 16"]),  # slice 132 does not tile into 16-pixel patches
    (["--organelles", "notathing"], ["notathing"]),
    (["--device", "tpu"], ["--device 'tpu'"]),
    (["--source", "nonsense"], ["nonsense"]),
    (["--output-image-dim", "100000"], ["--output-image-dim", "at most"]),
    (["--base-resolution", "nan"], ["--base-resolution", "finite"]),
    (["--min-label-fraction", "inf"], ["--min-label-fraction", "finite"]),
]


@pytest.mark.parametrize(("extra", "words"), BAD_EXTRACTION_OPTIONS)
def test_preprocess_volume_refuses_bad_options_before_loading_the_model(tmp_path, extra, words):
    out = tmp_path / "out"
    args = preprocess_args(out, 0, "random:tiny", *extra)
    line = one_error_line(call_main("preprocess_volume", *args), EXIT_USAGE, *words)
    assert not out.exists(), (line, sorted(out.rglob("*")))  # no status record, no output directory


@pytest.mark.parametrize(("extra", "words"), BAD_EXTRACTION_OPTIONS)
def test_a_dry_run_submission_refuses_the_same_options(tmp_path, extra, words):
    out = tmp_path / "out"
    args = ["--output-dir", out, "--num-volumes", "2", "--source", "synthetic", "--model-id", "random:tiny",
            "--scheduler", "local", "--dry-run", *TINY_GEOMETRY_ARGS, *extra]
    one_error_line(call_main("submit_preprocessing_jobs", *args), EXIT_USAGE, *words)
    assert not out.exists()


@pytest.mark.parametrize("script", ["preprocess_volume", "submit_preprocessing_jobs", "check_preprocessing"])
def test_an_empty_or_file_output_dir_is_refused_by_every_script(tmp_path, script, monkeypatch):
    monkeypatch.chdir(tmp_path)  # an empty --output-dir must not write here
    file = tmp_path / "a_file"
    file.write_text("x")
    extra = {"preprocess_volume": ["--volume-index", "0", "--source", "synthetic", "--model-id", "random:tiny", *TINY_GEOMETRY_ARGS],
             "submit_preprocessing_jobs": ["--num-volumes", "1", "--source", "synthetic", "--model-id", "random:tiny",
                                           "--scheduler", "local", *TINY_GEOMETRY_ARGS],
             "check_preprocessing": []}[script]
    one_error_line(call_main(script, "--output-dir", "", *extra), EXIT_USAGE, "--output-dir is empty")
    one_error_line(call_main(script, "--output-dir", file, *extra), EXIT_USAGE, "is a file, not a directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_settings_refuse_an_integer_features_dtype():
    from dinov3_cache.errors import UsageError
    from dinov3_cache.extraction.settings import ExtractionSettings

    with pytest.raises(UsageError, match="--features-dtype must be one of float16, bfloat16, float32, got 'int8'"):
        ExtractionSettings(output_dir="out", features_dtype="int8").config(0)


# ----------------------------------------------------------------------------- the audit


def test_audit_refuses_a_bind_address_it_cannot_serve_on(built_cache):
    for address in ("999.1.1.1", "no-such-host.invalid"):
        one_error_line(call_main("check_preprocessing", "--output-dir", built_cache, "--view", "0", "--bind-address", address),
                       EXIT_USAGE, "--bind-address", address)


def test_verifying_an_absent_volume_reports_it_missing_not_damaged(built_cache):
    result = call_main("check_preprocessing", "--output-dir", built_cache, "--verify-indices", "0", "99")
    assert result.returncode == 1, result.stdout + result.stderr  # incomplete, not damaged (4)
    assert "DAMAGED" not in result.stdout and "INCOMPLETE" in result.stdout
    assert "99" in next(line for line in result.stdout.splitlines() if "missing" in line)


def test_a_preview_that_cannot_be_written_is_one_line(built_cache, tmp_path, monkeypatch):
    """A full disk: the PNG writer's file cannot be written (ENOSPC, as /dev/full answers)."""
    import errno

    import dinov3_cache.audit.previews as previews

    def full_disk(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(previews, "write_png", full_disk)
    result = call_main("check_preprocessing", "--output-dir", built_cache, "--preview", tmp_path / "previews", "--verify-indices", "0")
    one_error_line(result, 1, "cannot write the preview of volume 0", "No space left on device")


# ----------------------------------------------------------------------------- local submissions


def local_submission(out: Path, model_dir: Path, *extra: str) -> list[str]:
    return ["--output-dir", str(out), "--num-volumes", "2", "--source", "synthetic", "--model-id", str(model_dir),
            "--scheduler", "local", *TINY_GEOMETRY_ARGS, *extra]


def test_a_volume_held_by_another_run_is_not_a_failure_and_counts_once_that_run_completes_it(tmp_path, tiny_model_dir):
    from dinov3_cache.cluster.local import HELD, SKIPPED, ElementResult
    from dinov3_cache.locks import VolumeLock

    out = tmp_path / "cache"
    out.mkdir()
    with VolumeLock(VolumePaths(out, 1)):  # what an overlapping submission's live run holds
        result = call_main("submit_preprocessing_jobs", *local_submission(out, tiny_model_dir))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "volume 1: held by another live run" in result.stdout
    assert "1 completed, 0 skipped (already complete), 0 failed; 1 held by another run" in result.stdout
    # the other run completed it before this one ended: already complete, not failed
    assert ElementResult(1, 3, 1.0).state == HELD and ElementResult(1, 3, 1.0, present=True).state == SKIPPED


def test_ctrl_c_on_a_local_submission_says_interrupted_by_the_user(tmp_path, tiny_model_dir):
    args = local_submission(tmp_path / "cache", tiny_model_dir, "--max-concurrent", "2")
    process = subprocess.Popen([sys.executable, str(REPO / "submit_preprocessing_jobs.py"), *args], cwd=REPO, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for line in process.stdout:
        if line.startswith("running 2 volumes here"):
            break
    time.sleep(2)  # the volumes' processes are loading the model
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == EXIT_INTERRUPTED, stdout + stderr
    assert "Traceback" not in stderr
    volume_lines = [line for line in stdout.splitlines() if line.startswith("volume ")]
    assert volume_lines and all("interrupted by the user" in line or "completed" in line for line in volume_lines), stdout
