"""dinov3_cache.locks: one owner per volume index; the kernel frees the lock of a dead holder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dinov3_cache.errors import EXIT_LOCKED
from dinov3_cache.locks import VolumeLock, VolumeLocked, lock_is_held
from dinov3_cache.paths import VolumePaths

REPO = Path(__file__).resolve().parents[1]
HOLD = """
import sys, time
from pathlib import Path
from dinov3_cache.locks import VolumeLock
from dinov3_cache.paths import VolumePaths
with VolumeLock(VolumePaths(Path(sys.argv[1]), 0)):
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_second_owner_is_refused_with_the_holder_named(tmp_path):
    paths = VolumePaths(tmp_path, 0)
    assert not lock_is_held(paths)  # no lock file yet
    with VolumeLock(paths):
        assert lock_is_held(paths)
        with pytest.raises(VolumeLocked, match=f"pid {os.getpid()} on ") as refused:
            VolumeLock(paths).__enter__()
        assert refused.value.exit_status == EXIT_LOCKED
    assert not lock_is_held(paths)
    with VolumeLock(paths):  # free again
        pass


def test_the_lock_of_a_killed_holder_is_free(tmp_path):
    paths = VolumePaths(tmp_path, 0)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "held"
        assert lock_is_held(paths)
        with pytest.raises(VolumeLocked, match=f"pid {holder.pid} "):
            VolumeLock(paths).__enter__()
    finally:
        holder.kill()
        holder.wait()
    assert not lock_is_held(paths)
    with VolumeLock(paths):
        assert paths.lock.read_text().startswith(f"pid {os.getpid()} ")
