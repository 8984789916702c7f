"""A full disk at every write a run makes itself (the lock, the status records, the arrays'
attributes, the metadata), and a committed volume whose last steps fail: one line, nothing left
behind, never a `running` record, a committed volume never reported failed. The writes fail
through a preloaded library (tests/full_disk.py); the arrays' own writes filling a real small
file system are tests/test_crash_safety.py's."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import call_main, preprocess_args
from full_disk import FullDiskServer, build_shim

from dinov3_cache.commit_protocol import committed_arrays, partial_debris
from dinov3_cache.loader.dataset import PreprocessedDINOv3Dataset
from dinov3_cache.paths import VolumePaths, temp_path
from dinov3_cache.records import read_json, read_status, write_status

DEAD_PID = 999_999_999

needs_cc = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                              reason="a C compiler builds the library that makes writes fail")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    work = tmp_path_factory.mktemp("full-disk-server")
    library = build_shim(work)
    if library is None:
        pytest.skip("a C compiler builds the library that makes writes fail")
    server = FullDiskServer(work, library)
    yield server
    server.close()


def commit_id(paths: VolumePaths) -> str | None:
    committed = committed_arrays(paths)
    return getattr(committed, "commit_id", None)


def problems_after(run, paths: VolumePaths, old_commit: str | None) -> list[str]:
    """What a run that met a full disk must not leave or say."""
    found = []
    if "Traceback" in run.stderr or "Errno 28" in run.stderr:
        found.append("a traceback or a raw OSError")
    state = (read_status(paths) or {}).get("state")
    if state == "running":
        found.append("the status record says running")
    if partial_debris(paths):
        found.append(f"left {[p.name for p in partial_debris(paths)]}")
    now = commit_id(paths)
    if run.returncode == 0:
        if now in (None, old_commit) or state not in (None, "complete"):
            found.append(f"exit 0 without a new committed volume (status {state})")
        if state is None and "status record could not be written" not in run.stderr:
            found.append("no warning that the status record is missing")
    else:
        last = run.stderr.strip().splitlines()[-1] if run.stderr.strip() else ""
        if run.returncode != 1 or not (last.startswith("error:") and "is full" in last):
            found.append(f"exit {run.returncode} with {last!r}, not the one line")
        if now != old_commit:
            found.append("a failed run changed the committed volume")
    return found


@needs_cc
@pytest.mark.parametrize("overwrite", [False, True], ids=["new", "overwrite"])
def test_a_disk_full_from_any_write_on_is_one_line_and_leaves_nothing(server, tmp_path, tiny_model_dir, overwrite):
    """The disk fills at the k-th write the run makes itself and stays full (as when another
    writer keeps it full), for every k: the lock, both status records, the arrays' attributes,
    the metadata."""
    def args(out: Path) -> list[str]:
        return preprocess_args(out, 0, tiny_model_dir, *(["--overwrite"] if overwrite else []))

    counted = server.run(args(tmp_path / "counted"), f"{tmp_path / 'counted'}/")
    assert counted.returncode == 0 and counted.writes >= 5, counted.stderr[-2000:]
    failures = {}
    for k in range(counted.writes):
        out = tmp_path / f"full{k}"
        paths = VolumePaths(out, 0)
        if overwrite:
            assert server.run(args(out)).returncode == 0
        old = commit_id(paths)
        run = server.run(args(out), f"{out}/", allowed=k)
        if problems := problems_after(run, paths, old):
            failures[k] = problems + [run.stderr[-600:]]
        if commit_id(paths) is not None:  # whichever volume stands is readable
            assert PreprocessedDINOv3Dataset(out, [0])[0][0].shape[0] == 32
    assert failures == {}


@needs_cc
def test_a_status_record_that_cannot_be_written_after_the_commit_is_a_warning(server, tmp_path, tiny_model_dir):
    """The 'running' record is written, the 'complete' one is not: the volume is complete, the
    job exits 0 with a warning, no record says running, and a rerun writes the record."""
    args = preprocess_args(tmp_path, 0, tiny_model_dir)
    run = server.run(args, VolumePaths(tmp_path, 0).status.name, allowed=1)
    assert run.returncode == 0 and "volume 0 complete" in run.stdout, run.stderr[-2000:]
    assert "status record could not be written" in run.stderr and "Traceback" not in run.stderr
    paths = VolumePaths(tmp_path, 0)
    assert read_status(paths) is None and partial_debris(paths) == []
    rerun = call_main("preprocess_volume", *args, check=True)
    assert "already complete" in rerun.stdout and read_status(paths)["state"] == "complete"


@pytest.mark.parametrize("said", ["running", "failed"])
def test_a_rerun_repairs_the_status_of_a_volume_killed_after_its_commit_point(tmp_path, tiny_model_dir, said):
    """A kill between the metadata rename and the last status write leaves a committed volume
    whose record says running (a dead process) or failed; the rerun skips it and repairs it."""
    args = preprocess_args(tmp_path, 0, tiny_model_dir)
    call_main("preprocess_volume", *args, check=True)
    paths = VolumePaths(tmp_path, 0)
    stale_record(paths, said)
    rerun = call_main("preprocess_volume", *args, check=True)
    assert "already complete" in rerun.stdout
    assert read_status(paths)["state"] == "complete"


def stale_record(paths: VolumePaths, said: str) -> None:
    """The record a run killed after its commit point leaves (its pid long gone)."""
    write_status(paths, said)
    record = read_json(paths.status)
    paths.status.write_text(json.dumps({**record, "pid": DEAD_PID}))


def test_remove_debris_repairs_committed_volumes_status_and_lists_every_leftover(tmp_path, tiny_model_dir):
    """The audit lists what a run that could not clean up leaves (a commit directory, temporary
    files, no array under the volume's names) and --remove-debris removes exactly that; it also
    repairs a committed volume's stale record."""
    for index in (0, 1):
        call_main("preprocess_volume", *preprocess_args(tmp_path, index, tiny_model_dir), check=True)
    stale_record(VolumePaths(tmp_path, 0), "running")
    left = VolumePaths(tmp_path, 2)
    (left.commit_dir("e" * 32) / "features.zarr").mkdir(parents=True)
    leftovers = {left.commit_dir("e" * 32), temp_path(left.metadata, DEAD_PID), temp_path(left.status, DEAD_PID)}
    for path in leftovers - {left.commit_dir("e" * 32)}:
        path.parent.mkdir(exist_ok=True)
        path.write_text("{")
    stale_record(left, "running")

    report = json.loads(call_main("check_preprocessing", "--output-dir", tmp_path, "--indices", "0-2", "--json").stdout)
    listed = {Path(d) for p in report["partial"] for d in p["debris"]}
    assert listed == leftovers
    removed = call_main("check_preprocessing", "--output-dir", tmp_path, "--remove-debris")
    assert removed.returncode == 0 and "removed 3 debris entries" in removed.stdout
    assert "volume 0 is committed: its status record said running, now complete" in removed.stdout
    assert read_status(VolumePaths(tmp_path, 0))["state"] == "complete"
    assert not any(p.exists() for p in leftovers)


def test_remove_debris_on_a_read_only_cache_is_one_line(tmp_path, tiny_model_dir, monkeypatch):
    call_main("preprocess_volume", *preprocess_args(tmp_path, 0, tiny_model_dir), check=True)
    paths = VolumePaths(tmp_path, 0)
    paths.commit_dir("e" * 32).mkdir()
    real_open = os.open

    def read_only_open(path, flags, *args, **kwargs):
        if str(path).startswith(str(tmp_path)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only_open)  # a read-only mount (root ignores chmod)
    result = call_main("check_preprocessing", "--output-dir", tmp_path, "--remove-debris")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: cannot remove debris"), result.stderr
    assert "Read-only file system" in lines[0] and paths.commit_dir("e" * 32).exists()


def test_an_overwrite_whose_old_array_cannot_be_removed_succeeds_with_a_warning(tmp_path, tiny_model_dir, monkeypatch):
    """The new volume is committed (its metadata in place) before the old arrays go: an old
    array that cannot be removed is a warning, the new volume is read from its commit directory,
    and the next run finishes the commit."""
    args = preprocess_args(tmp_path, 0, tiny_model_dir)
    call_main("preprocess_volume", *args, check=True)
    paths = VolumePaths(tmp_path, 0)
    old = commit_id(paths)
    real_rmdir = os.rmdir

    def rmdir(path, *rest, **kwargs):
        if str(path) == str(paths.array("features")):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_rmdir(path, *rest, **kwargs)

    monkeypatch.setattr(os, "rmdir", rmdir)
    result = call_main("preprocess_volume", *args, "--overwrite")
    monkeypatch.undo()
    assert result.returncode == 0 and "volume 0 complete" in result.stdout, result.stderr[-2000:]
    assert "finishing its commit failed" in result.stderr
    new = commit_id(paths)
    assert new != old and read_status(paths)["state"] == "complete"
    assert paths.commit_dir(new).is_dir()  # the new features are read from here meanwhile
    assert PreprocessedDINOv3Dataset(tmp_path, [0])[0][0].shape[0] == 32
    rerun = call_main("preprocess_volume", *args, check=True)
    assert "already complete" in rerun.stdout
    assert not paths.commit_dir(new).exists() and paths.array("features").is_dir() and partial_debris(paths) == []
