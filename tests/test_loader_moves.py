"""A volume that moves or is replaced under an open dataset: arrays whose commit is finished
(commit directory -> seed names) are read again where they are now, with the same values; a
volume replaced (--overwrite) or removed while being read is an error, never its values."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import call_main, preprocess_args

from dinov3_cache import commit_protocol
from dinov3_cache.commit_protocol import committed_arrays, remove_tree
from dinov3_cache.loader.reader import VolumeReader
from dinov3_cache.paths import VolumePaths
from dinov3_cache.zarr_arrays import open_array
from preprocessed_dataloader import PreprocessedDINOv3Dataset, VolumeReadError

READERS = ["auto", "tensorstore"]
REPLACED = r"volume 0 in .* was replaced \(now commit \w+, loaded as commit \w+\) while being read, so its values are not delivered; recreate the dataset"


@pytest.fixture(scope="module")
def zstd_cache(tmp_path_factory, tiny_model_dir) -> Path:
    """Volume 0 compressed with zstd (read through TensorStore whatever the reader option)."""
    out = tmp_path_factory.mktemp("zstd")
    call_main("preprocess_volume", *preprocess_args(out, 0, tiny_model_dir, "--compression", "zstd"), check=True)
    return out


@pytest.fixture(scope="module")
def tokens_cache(tmp_path_factory, tiny_model_dir) -> Path:
    out = tmp_path_factory.mktemp("tokens")
    call_main("preprocess_volume", *preprocess_args(out, 0, tiny_model_dir, "--layout", "tokens"), check=True)
    return out


def copy_cache(source: Path, tmp_path: Path) -> Path:
    """A private copy of a shared (read-only) cache's volume 0."""
    target = tmp_path / "cache"
    target.mkdir()
    paths = VolumePaths(source, 0)
    for array in paths.existing_arrays():
        shutil.copytree(array, target / array.name)
    shutil.copy(paths.metadata, target / paths.metadata.name)
    return target


def into_commit_directory(cache: Path) -> None:
    """Leave volume 0 as a commit killed before its arrays took the seed names: each array in
    volume_000000.commit-ID/NAME.zarr, ID the committed metadata's commit id."""
    paths = VolumePaths(cache, 0)
    committed = committed_arrays(paths)
    commit_id, arrays = committed.commit_id, committed.arrays
    paths.commit_dir(commit_id).mkdir()
    for name in arrays:
        paths.array(name).rename(paths.commit_dir(commit_id) / f"{name}.zarr")
    assert paths.located_array(arrays[0], commit_id) == paths.commit_dir(commit_id) / f"{arrays[0]}.zarr"


def finish_commit(cache: Path) -> None:
    """What the next run of the index does first: the arrays take their seed names."""
    paths = VolumePaths(cache, 0)
    commit_protocol.finish_commit(paths, committed_arrays(paths))
    assert not any(p.name.startswith("volume_000000.commit-") for p in cache.iterdir())


def item(dataset: PreprocessedDINOv3Dataset, index: int = 0) -> tuple[torch.Tensor, ...]:
    features, gt, mask = dataset[index]
    return features, gt, mask


def assert_items_equal(a: tuple, b: tuple) -> None:
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


# ----------------------------------------------------------------------------- moved: same values


@pytest.mark.parametrize("reader, compressed", [("auto", False), ("tensorstore", False), ("auto", True)])
def test_arrays_moved_to_their_seed_names_under_an_open_dataset_read_the_same(built_cache, zstd_cache, tmp_path, reader, compressed):
    cache = copy_cache(zstd_cache if compressed else built_cache, tmp_path)
    into_commit_directory(cache)
    dataset = PreprocessedDINOv3Dataset(cache, reader=reader, features_dtype=None, gt_dtype=None)
    before = item(dataset)
    finish_commit(cache)
    after = item(dataset)
    assert_items_equal(before, after)
    stored = open_array(VolumePaths(cache, 0).array("features")).read().result()
    assert torch.equal(after[0], torch.from_numpy(stored)) and after[0].abs().max() > 0
    opened = dataset.resources.readers[0].opened  # the cached reader now reads the seed names
    assert {a.path for a in opened.arrays.values()} == {VolumePaths(cache, 0).array(n) for n in ("features", "gt", "mask")}


def test_crops_of_a_tokens_volume_moved_under_an_open_dataset_read_the_same(tokens_cache, tmp_path):
    cache = copy_cache(tokens_cache, tmp_path)
    into_commit_directory(cache)
    dataset = PreprocessedDINOv3Dataset(cache, crop_size=(5, 6, 7), samples_per_volume=2)
    before = [item(dataset, i) for i in range(2)]
    finish_commit(cache)
    for i in range(2):
        assert_items_equal(before[i], item(dataset, i))
    assert before[0][0].abs().max() > 0


def test_arrays_that_move_again_during_the_repeated_read_are_an_error(built_cache, tmp_path, monkeypatch):
    cache = copy_cache(built_cache, tmp_path)
    into_commit_directory(cache)
    dataset = PreprocessedDINOv3Dataset(cache)
    item(dataset)
    reopen = VolumeReader._reopen

    def reopen_then_move(reader):
        reopen(reader)
        into_commit_directory(cache)  # the arrays leave the paths just opened

    monkeypatch.setattr(VolumeReader, "_reopen", reopen_then_move)
    finish_commit(cache)
    with pytest.raises(VolumeReadError, match=r"volume 0 in .* was moved twice while being read"):
        item(dataset)


# ----------------------------------------------------------------------------- replaced or removed: an error


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("finished", [True, False], ids=["finished", "killed-before-the-seed-names"])
def test_a_volume_overwritten_under_an_open_dataset_is_an_error_never_values(
    built_cache, tiny_model_dir, tmp_path, monkeypatch, reader, finished
):
    cache = copy_cache(built_cache, tmp_path)
    dataset = PreprocessedDINOv3Dataset(cache, reader=reader, crop_size=(4, 4, 4), samples_per_volume=3)
    item(dataset)
    unread = PreprocessedDINOv3Dataset(cache, reader=reader)  # its arrays are opened after the overwrite
    if not finished:  # new metadata committed, the old arrays still under the seed names
        monkeypatch.setattr(commit_protocol, "tidy_volume", lambda paths: [])
    call_main("preprocess_volume", *preprocess_args(cache, 0, tiny_model_dir, "--planes", "xy", "--overwrite"), check=True)
    monkeypatch.undo()
    for index in range(3):  # crops read before and crops not read before
        with pytest.raises(VolumeReadError, match=REPLACED):
            item(dataset, index)
    with pytest.raises(VolumeReadError, match=REPLACED):
        item(unread)
    fresh = PreprocessedDINOv3Dataset(cache, reader=reader, crop_size=(4, 4, 4))  # what to do: a new dataset
    assert fresh.volumes[0].metadata.configuration.planes == ("xy",) and item(fresh)[0].abs().max() > 0


def test_a_tokens_volume_overwritten_under_an_open_dataset_is_an_error(tokens_cache, tiny_model_dir, tmp_path):
    cache = copy_cache(tokens_cache, tmp_path)
    dataset = PreprocessedDINOv3Dataset(cache, crop_size=(4, 4, 4))
    item(dataset)
    call_main("preprocess_volume", *preprocess_args(cache, 0, tiny_model_dir, "--layout", "tokens", "--planes", "xy", "--overwrite"),
              check=True)
    with pytest.raises(VolumeReadError, match=REPLACED):
        item(dataset)


def test_a_volume_removed_under_an_open_dataset_is_an_error(built_cache, tmp_path):
    cache = copy_cache(built_cache, tmp_path)
    dataset = PreprocessedDINOv3Dataset(cache)
    item(dataset)
    VolumePaths(cache, 0).metadata.unlink()
    for array in VolumePaths(cache, 0).existing_arrays():
        remove_tree(array)
    with pytest.raises(VolumeReadError, match=r"volume 0 in .* was removed \(its metadata file is gone\) while being read"):
        item(dataset)
