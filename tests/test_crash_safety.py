"""Crash safety: kills inside an overwrite's commit, debris of dead runs, damaged volumes
refused by the loader (the short version of benchmarks/fault_campaign.py)."""

from __future__ import annotations

import shutil

import pytest
from conftest import call_main, preprocess_args

from benchmarks.fault_campaign import Tally, damage_campaign, kill_campaign
from dinov3_cache.layout import VolumePaths, partial_debris, temp_path
from dinov3_cache.loader.dataset import PreprocessedDINOv3Dataset
from dinov3_cache.loader.reader import CacheError

needs_strace = pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed (apt-get install strace)")


@needs_strace
def test_overwrite_killed_at_each_commit_syscall_leaves_old_or_new(tmp_path, tiny_model_dir):
    tally = Tally()
    kill_campaign(tiny_model_dir, tmp_path, True, "commit", tally)
    assert tally.trials >= 5
    assert tally.failures == []


def test_damage_is_refused_never_delivered(tmp_path, built_cache):
    always, verified = Tally(), Tally()
    damage_campaign(built_cache, tmp_path, always, verified)
    assert always.trials >= 4 and verified.trials >= 7
    assert always.failures == [] and verified.failures == []


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
