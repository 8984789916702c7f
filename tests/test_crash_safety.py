"""Crash safety: an overwrite killed at each of its renames, unlinks and directory removals,
debris of dead runs, damaged volumes refused by the loader (the short version of
benchmarks/fault_campaign.py)."""

from __future__ import annotations

import os
import shutil

import pytest
from conftest import call_main, preprocess_args

from benchmarks.fault_campaign import Campaign, Tally, damage_campaign, kill_sweep
from benchmarks.fault_injection import ForkServer
from dinov3_cache.commit_protocol import partial_debris, remove_tree
from dinov3_cache.loader.dataset import PreprocessedDINOv3Dataset
from dinov3_cache.loader.volumes import CacheError
from dinov3_cache.paths import VolumePaths, temp_path

needs_cc = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                              reason="a C compiler builds the library that kills runs at chosen calls")


@pytest.mark.slow
@needs_cc
def test_overwrite_killed_at_each_rename_unlink_rmdir_leaves_old_or_new(tmp_path, tiny_model_dir):
    """SIGKILL at the k-th call, k = 1, 2, ... until the run finishes: after each kill the
    loader (with checksums) and --verify-indices see the old or the new volume, and a rerun
    leaves the new one and no debris."""
    tally = Tally()
    with ForkServer(tmp_path / "server") as server:
        kill_sweep(Campaign(server, tmp_path, tiny_model_dir).prepare(), True, tally)
    assert tally.trials >= 20  # the whole run: staging writes, commit, removal of the old arrays
    assert tally.failures == []


def test_damage_is_refused_never_delivered(tmp_path, built_cache):
    default, always = Tally(), Tally()  # default settings: every kind; verify_checksums=False: the kinds checked regardless
    damage_campaign(built_cache, tmp_path, default, always)
    assert always.trials >= 6 and default.trials >= 11
    assert always.failures == [] and default.failures == []


def test_a_skipping_rerun_removes_dead_runs_debris(tmp_path, tiny_model_dir):
    args = preprocess_args(tmp_path, 0, tiny_model_dir)
    call_main("preprocess_volume", *args, check=True)
    paths = VolumePaths(tmp_path, 0)
    (paths.staging / "features.zarr").mkdir(parents=True)
    paths.commit_dir("0" * 32).mkdir()
    temp_path(paths.metadata, 999_999_999).write_text("{")
    temp_path(paths.status, 999_999_999).write_text("{")
    assert len(partial_debris(paths)) == 4
    result = call_main("preprocess_volume", *args, check=True)
    assert "skipping" in result.stdout
    assert partial_debris(paths) == []
    assert PreprocessedDINOv3Dataset(tmp_path, [0])[0][0].shape[0] == 32


def test_volume_indices_string_is_refused(built_cache):
    with pytest.raises(CacheError, match="string"):
        PreprocessedDINOv3Dataset(built_cache, "12")


def test_free_space_check_is_a_function_of_free_and_needed_bytes(tmp_path):
    from dinov3_cache.extraction.commit import SPACE_MARGIN_BYTES, OutOfSpace, check_free_space

    needed = 100 * 2**20
    check_free_space(2 * needed, needed, tmp_path, 7)  # room enough: no error
    with pytest.raises(OutOfSpace, match="volume 7 needs up to .* MiB but .* has 100.0 MiB free.*--no-space-check"):
        check_free_space(needed, needed, tmp_path, 7)  # the margin is required too
    with pytest.raises(OutOfSpace):
        check_free_space(SPACE_MARGIN_BYTES - 1, 0, tmp_path, 7)


def test_only_a_full_output_file_system_is_reported_as_the_outputs(tmp_path):
    import errno

    from dinov3_cache.extraction.commit import OutOfSpace, as_storage_error

    paths = VolumePaths(tmp_path / "out", 3)
    inside = OSError(errno.ENOSPC, "No space left on device", str(paths.staging / "features" / "0.0.0.0"))
    assert isinstance(as_storage_error(inside, paths), OutOfSpace)
    elsewhere = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "hf-cache" / "model.safetensors"))
    assert as_storage_error(elsewhere, paths) is elsewhere  # names its own file, not --output-dir
    tensorstore = ValueError("RESOURCE_EXHAUSTED: Error writing local file: No space left on device")
    assert isinstance(as_storage_error(tensorstore, paths), OutOfSpace)


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 2 MiB file system (mounting needs root)."""
    import os
    import subprocess

    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_removing_staging_survives_files_that_come_and_go(tmp_path, monkeypatch):
    """What a failed multi-chunk write leaves for a moment: a lock file vanishes between the
    listing and its unlink, and another appears before the directory's rmdir."""
    tree = tmp_path / "volume_000000.partial" / "features.zarr"
    tree.mkdir(parents=True)
    for name in ("0.0.0.0", "0.0.0.0.__lock", ".zarray"):
        (tree / name).write_bytes(b"x")
    real_unlink, real_rmdir = os.unlink, os.rmdir
    events = []

    def unlink(name, *args, **kwargs):
        if str(name).endswith(".__lock") and "vanished" not in events:
            events.append("vanished")
            real_unlink(name, *args, **kwargs)  # TensorStore removed it first
        return real_unlink(name, *args, **kwargs)

    def rmdir(name, *args, **kwargs):
        if str(name).endswith("features.zarr") and "appeared" not in events:
            events.append("appeared")
            (tree / "0.0.1.0.__lock").write_bytes(b"x")  # and took another lock meanwhile
        return real_rmdir(name, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", unlink)
    monkeypatch.setattr(os, "rmdir", rmdir)
    remove_tree(tmp_path / "volume_000000.partial")
    assert events == ["vanished", "appeared"] and not (tmp_path / "volume_000000.partial").exists()


def test_a_full_disk_is_one_line_and_leaves_no_partial_volume(tiny_tmpfs, tiny_model_dir):
    args = preprocess_args(tiny_tmpfs, 0, tiny_model_dir, "--output-image-dim", "64", "--compression", "none")
    refused = call_main("preprocess_volume", *args)
    assert refused.returncode == 1 and "free space or choose another --output-dir" in refused.stderr.strip().splitlines()[-1]
    paths = VolumePaths(tiny_tmpfs, 0)
    assert not paths.staging.exists() and not paths.metadata.exists()
    # without the check the writes themselves hit the full file system: one line, no staging left
    full = call_main("preprocess_volume", *args, "--no-space-check")
    last = full.stderr.strip().splitlines()[-1]
    assert full.returncode == 1 and last.startswith("error:") and "is full" in last, full.stderr[-2000:]
    assert not paths.staging.exists() and not paths.metadata.exists()


def test_a_sigterm_held_during_a_commit_stops_the_next_volume():
    """After a commit SIGTERM is held (the committed volume's job must exit 0); in a process
    with more volumes, re-arming before the next one raises it then."""
    import signal

    from dinov3_cache.extraction.signals import DEFERRED_SIGNALS, Terminated, hold_signals, raise_on_sigterm

    previous = signal.getsignal(signal.SIGTERM)
    try:
        raise_on_sigterm()
        hold_signals()
        signal.raise_signal(signal.SIGTERM)  # held, not raised
        assert DEFERRED_SIGNALS == [signal.SIGTERM]
        with pytest.raises(Terminated):
            raise_on_sigterm()
        assert DEFERRED_SIGNALS == []
    finally:
        DEFERRED_SIGNALS.clear()
        signal.signal(signal.SIGTERM, previous)


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_signal_after_the_volume_is_complete_keeps_exit_0(tmp_path, tiny_model_dir, sig):
    """A walltime SIGTERM or a Ctrl-C that comes once 'volume 0 complete' is printed, at once or
    while the interpreter tears torch and TensorStore down (most of a second), leaves exit 0."""
    import signal
    import subprocess
    import sys
    import time

    from conftest import REPO

    for delay in (0.0, 0.05, 0.2):
        out = tmp_path / f"after{delay}"
        process = subprocess.Popen([sys.executable, str(REPO / "preprocess_volume.py"), *preprocess_args(out, 0, tiny_model_dir)],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   env={**os.environ, "HF_HUB_OFFLINE": "1"})
        for line in process.stdout:
            if "volume 0 complete" in line:
                time.sleep(delay)
                process.send_signal(getattr(signal, sig))
                break
        stderr = process.communicate(timeout=300)[1]
        assert process.returncode == 0, f"{sig} {delay} s after the commit: exit {process.returncode}\n{stderr[-2000:]}"
        assert "Traceback" not in stderr and VolumePaths(out, 0).metadata.exists()


def test_a_ctrl_c_held_during_a_commit_stops_the_next_volume_and_the_handler_comes_back():
    import signal

    from dinov3_cache.extraction.signals import DEFERRED_SIGNALS, hold_signals, raise_on_sigterm

    previous = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    try:
        raise_on_sigterm()
        hold_signals()
        signal.raise_signal(signal.SIGINT)  # held, not raised
        assert DEFERRED_SIGNALS == [signal.SIGINT]
        with pytest.raises(KeyboardInterrupt):
            raise_on_sigterm()
        assert signal.getsignal(signal.SIGINT) is previous[1] and DEFERRED_SIGNALS == []
    finally:
        DEFERRED_SIGNALS.clear()
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGINT, previous[1])


def test_a_library_callers_signal_handlers_are_never_taken_over():
    """hold_signals acts only where raise_on_sigterm installed its handler (the script): a
    caller's own SIGTERM and Ctrl-C handlers stay in place through a commit."""
    import signal

    from dinov3_cache.extraction.signals import DEFERRED_SIGNALS, hold_signals

    def callers_handler(signum, frame):
        pass

    previous = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    try:
        signal.signal(signal.SIGTERM, callers_handler)
        signal.signal(signal.SIGINT, callers_handler)
        hold_signals()
        assert signal.getsignal(signal.SIGTERM) is callers_handler and signal.getsignal(signal.SIGINT) is callers_handler
        assert DEFERRED_SIGNALS == []
    finally:
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGINT, previous[1])
