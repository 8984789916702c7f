"""dinov3_cache.commit_protocol: a commit at every step leaves a complete volume, later runs
finish it, and debris is exactly what no reader of the committed volume uses."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from dinov3_cache.commit_protocol import (
    UNREADABLE,
    Committed,
    commit_volume,
    committed_arrays,
    committed_volume_indices,
    dead_debris,
    finish_commit,
    is_volume_complete,
    partial_debris,
    remove_abandoned_tree,
    remove_dead_debris,
    remove_tree,
    tidy_volume,
)
from dinov3_cache.locks import VolumeLock
from dinov3_cache.paths import VolumePaths, temp_path
from dinov3_cache.records import read_json, write_json_atomic
from dinov3_cache.schema import VolumeMetadata

FIXTURE_METADATA = Path(__file__).parent / "fixtures" / "cache_v1" / "volume_000000_metadata.json"


def metadata(commit_id: str, arrays=("features", "gt", "mask")) -> VolumeMetadata:
    """A volume's metadata naming `commit_id` and `arrays` (the fixture's, changed)."""
    doc = read_json(FIXTURE_METADATA)
    doc["dtypes"] = {name: doc["dtypes"][name] for name in arrays}
    doc["integrity"] = {**doc["integrity"], "commit_id": commit_id}
    return VolumeMetadata.build(VolumeMetadata.from_dict(doc))


def fake_array(path: Path, content: str) -> None:
    path.mkdir(parents=True)
    (path / "c" / "0").parent.mkdir()
    (path / "c" / "0").write_text(content)


def content(path: Path) -> str:
    return (path / "c" / "0").read_text()


def committed(paths: VolumePaths, commit_id: str, arrays=("features", "gt", "mask")) -> None:
    """A finished commit of `arrays`, each holding its commit id."""
    for name in arrays:
        fake_array(paths.array(name), commit_id)
    write_json_atomic(paths.metadata, metadata(commit_id, arrays).to_dict())


def stage(paths: VolumePaths, commit_id: str, arrays=("features", "gt")) -> None:
    for name in arrays:
        fake_array(paths.staged_array(name), commit_id)


def test_a_commit_replaces_the_volume_and_leaves_nothing_else(tmp_path):
    paths = VolumePaths(tmp_path, 0)
    committed(paths, "old", ("features", "gt", "mask"))
    stage(paths, "new", ("features", "gt"))
    commit_volume(paths, "new", metadata("new", ("features", "gt")))
    assert committed_arrays(paths) == Committed("new", ("features", "gt"))
    assert content(paths.array("features")) == content(paths.array("gt")) == "new"
    assert not paths.array("mask").exists()  # the replaced volume's array the new one lacks
    assert sorted(os.listdir(tmp_path)) == ["volume_000000_features.zarr", "volume_000000_gt.zarr",
                                            "volume_000000_metadata.json"]


def test_a_commit_killed_after_its_commit_point_is_read_from_its_commit_directory_and_finished_later(tmp_path):
    paths = VolumePaths(tmp_path, 0)
    committed(paths, "old")
    stage(paths, "new")
    os.rename(paths.staging, paths.commit_dir("new"))  # step 2
    write_json_atomic(paths.metadata, metadata("new", ("features", "gt")).to_dict())  # step 3, then killed
    assert is_volume_complete(tmp_path, 0)
    assert content(paths.located_array("gt", "new")) == "new"
    # the seed-named arrays are the replaced volume's: debris; the commit directory is not
    assert set(partial_debris(paths)) == {paths.array("features"), paths.array("gt"), paths.array("mask")}
    assert tidy_volume(paths) == [paths.array("mask")]  # finish_commit first renamed the others
    assert content(paths.array("gt")) == "new" and not paths.commit_dir("new").exists()
    assert partial_debris(paths) == []


def test_a_commit_killed_before_its_commit_point_leaves_the_old_volume(tmp_path):
    paths = VolumePaths(tmp_path, 0)
    committed(paths, "old")
    stage(paths, "new")
    os.rename(paths.staging, paths.commit_dir("new"))  # step 2, then killed
    stage(paths, "newer")  # and a later run killed while staging
    assert partial_debris(paths) == [paths.staging, paths.commit_dir("new")]
    tidy_volume(paths)
    assert committed_arrays(paths) == Committed("old", ("features", "gt", "mask"))
    assert content(paths.array("gt")) == "old" and partial_debris(paths) == []


def test_finishing_a_commit_is_idempotent(tmp_path):
    paths = VolumePaths(tmp_path, 0)
    fake_array(paths.committing_array("gt", "c1"), "c1")
    finish_commit(paths, Committed("c1", ("gt",)))
    finish_commit(paths, Committed("c1", ("gt",)))
    finish_commit(paths, Committed(None, ("gt",)))
    assert content(paths.array("gt")) == "c1" and os.listdir(tmp_path) == ["volume_000000_gt.zarr"]


def test_temporary_files_of_other_processes_are_debris(tmp_path):
    paths = VolumePaths(tmp_path, 0)
    committed(paths, "c")
    paths.logs.mkdir()
    theirs = [temp_path(paths.metadata, os.getpid() + 1), temp_path(paths.status, os.getpid() + 1)]
    mine = temp_path(paths.status, os.getpid())
    for path in [*theirs, mine]:
        path.write_text("{")
    assert sorted(partial_debris(paths)) == sorted(theirs)
    other_volume = VolumePaths(tmp_path, 1)
    assert partial_debris(other_volume) == []


def test_unreadable_metadata_makes_no_array_debris(tmp_path):
    paths = VolumePaths(tmp_path, 0)
    committed(paths, "c")
    fake_array(paths.array("raw"), "?")
    stage(paths, "s")
    paths.metadata.write_text("{ torn")
    assert committed_arrays(paths) == UNREADABLE
    assert partial_debris(paths) == [paths.staging]  # a person decides about the arrays
    paths.metadata.unlink()
    assert committed_arrays(paths) is None
    assert set(partial_debris(paths)) == {paths.staging, *paths.existing_arrays()}  # nothing committed uses them


def test_a_live_runs_files_are_not_debris_and_are_never_removed(tmp_path):
    paths = VolumePaths(tmp_path, 0)
    committed(paths, "c")
    stage(paths, "running")
    with VolumeLock(paths):
        assert partial_debris(paths) == [paths.staging] and dead_debris(paths) == []
        assert remove_dead_debris(paths) is None and paths.staging.is_dir()
    assert dead_debris(paths) == [paths.staging]
    [(removed, size)] = remove_dead_debris(paths)
    assert removed == paths.staging and size > 0 and not paths.staging.exists()
    assert committed_volume_indices(tmp_path) == [0] and committed_volume_indices(tmp_path / "absent") == []


def test_remove_tree_removes_files_trees_and_links_but_not_their_targets(tmp_path):
    target = tmp_path / "target"
    fake_array(target, "kept")
    link = tmp_path / "link"
    link.symlink_to(target)
    remove_tree(link)
    assert not link.exists() and not link.is_symlink() and content(target) == "kept"
    (tmp_path / "file").write_text("x")
    remove_tree(tmp_path / "file")
    remove_tree(target)
    remove_tree(tmp_path / "absent")
    assert os.listdir(tmp_path) == []


def test_the_fixture_volume_of_version_1_names_no_arrays(tmp_path):
    """Version 1 files record no dtypes: what their arrays are, nothing says, so none is debris."""
    paths = VolumePaths(tmp_path, 0)
    doc = read_json(FIXTURE_METADATA)
    del doc["dtypes"], doc["integrity"]
    write_json_atomic(paths.metadata, doc)
    fake_array(paths.array("features"), "v1")
    assert committed_arrays(paths) == UNREADABLE and partial_debris(paths) == []


@pytest.mark.parametrize("arrays", [("features",), ("tokens", "gt")])
def test_committed_arrays_are_read_through_the_schema(tmp_path, arrays):
    paths = VolumePaths(tmp_path, 0)
    write_json_atomic(paths.metadata, metadata("abc", ()).to_dict() | {"dtypes": {a: "uint8" for a in arrays}})
    assert committed_arrays(paths) == Committed("abc", arrays)


def test_a_staged_tree_recreated_by_a_late_chunk_write_is_removed_again(tmp_path):
    # a chunk write still running after its write reported the first failure recreates its directory
    staged = tmp_path / "volume_000000.partial"
    (staged / "features" / "c").mkdir(parents=True)

    written = threading.Event()

    def late_chunk_write():
        time.sleep(0.2)
        while not written.is_set():  # as a writer does: its directories may go while it creates them
            try:
                (staged / "features" / "c").mkdir(parents=True, exist_ok=True)
                (staged / "features" / "c" / "0").write_bytes(b"late")
                written.set()
            except FileNotFoundError:
                continue

    writer = threading.Thread(target=late_chunk_write)
    writer.start()
    remove_abandoned_tree(staged, quiet_seconds=0.5)
    writer.join()
    assert written.is_set()  # the tree was recreated after its first removal began
    assert not staged.exists()
