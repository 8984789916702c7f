"""dinov3_cache.paths: every file name of a volume, and which volume a name belongs to."""

from __future__ import annotations

from pathlib import Path

from dinov3_cache.paths import (
    VolumePaths,
    list_names,
    metadata_indices,
    preview_path,
    temp_path,
    temp_pid,
    volume_entry_index,
    volume_name,
    volume_names,
)


def test_the_files_of_a_volume(tmp_path):
    paths = VolumePaths(tmp_path, 7)
    assert volume_name(7) == paths.name == "volume_000007"
    assert paths.array("features") == tmp_path / "volume_000007_features.zarr"
    assert paths.metadata == tmp_path / "volume_000007_metadata.json"
    assert paths.staging == tmp_path / "volume_000007.partial"
    assert paths.staged_array("gt") == tmp_path / "volume_000007.partial" / "gt.zarr"
    assert paths.commit_dir("abc") == tmp_path / "volume_000007.commit-abc"
    assert paths.committing_array("gt", "abc") == tmp_path / "volume_000007.commit-abc" / "gt.zarr"
    assert (paths.status, paths.lock) == (tmp_path / "logs" / "volume_000007.status.json", tmp_path / "logs" / "volume_000007.lock")
    assert (paths.log_out.name, paths.log_err.name) == ("volume_000007.out", "volume_000007.err")
    assert preview_path(tmp_path / "p", 7) == tmp_path / "p" / "volume_000007_preview.png"
    assert volume_name(1234567) == "volume_1234567"  # more than six digits when needed


def test_an_array_is_located_in_its_commit_directory_while_it_is_there(tmp_path):
    paths = VolumePaths(tmp_path, 0)
    assert paths.located_array("gt", "abc") == paths.array("gt")
    paths.committing_array("gt", "abc").mkdir(parents=True)
    assert paths.located_array("gt", "abc") == paths.committing_array("gt", "abc")
    assert paths.located_array("gt", "other") == paths.array("gt")
    assert paths.located_array("gt", None) == paths.array("gt")
    assert paths.located_array("mask", "abc") == paths.array("mask")  # not moving: under its own name


def test_which_volume_a_name_belongs_to(tmp_path):
    paths = VolumePaths(tmp_path, 12)
    names = [paths.array("gt").name, paths.metadata.name, paths.staging.name, paths.commit_dir("x").name,
             paths.status.name, paths.lock.name, temp_path(paths.metadata, 99).name, temp_path(paths.status, 5).name]
    assert [volume_entry_index(n) for n in names] == [12] * len(names)
    others = ["volume_000013_gt.zarr", "settings.json", "volume_12_gt.zarr", "volume_000012x", "scheduler", ".hidden"]
    assert [volume_entry_index(n) for n in others] == [13, None, None, None, None, None]
    assert volume_names(names + others, 12) == names


def test_temporary_names_carry_their_process(tmp_path):
    path = tmp_path / "volume_000000_metadata.json"
    temp = temp_path(path, 4321)
    assert temp.parent == tmp_path and temp.name.startswith(".") and temp_pid(temp) == 4321
    assert temp_pid(path) is None and temp_pid(tmp_path / ".x.tmp") is None


def test_committed_indices_come_from_the_metadata_names_alone(tmp_path):
    names = ["volume_000010_metadata.json", "volume_000002_metadata.json", "volume_000003_gt.zarr",
             ".volume_000004_metadata.json.1.tmp", "volume_000005.partial", "volume_1000000_metadata.json"]
    assert metadata_indices(names) == [2, 10, 1000000]


def test_listing_a_missing_directory_is_empty(tmp_path):
    assert list_names(tmp_path / "absent") == []
    (tmp_path / "file").write_text("")
    assert list_names(tmp_path / "file") == [] and list_names(tmp_path) == ["file"]
    assert isinstance(VolumePaths(Path(tmp_path), 0).existing_arrays(), list)
