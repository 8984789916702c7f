"""The raw reader's copy paths (dinov3_cache/loader/chunk_copy.py) give TensorStore's values:
whole volumes and crops at every offset class (chunk-aligned, straddling, at the volume edge),
in the stored dtype and cast, for the default-like chunks (staged slab copy, mapped copy),
chunks that do not divide the volume, and chunks spanning y and x (read straight into the
batch); the first read of a file is still checked. Real caches from the CLI."""

from __future__ import annotations

import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import call_main, preprocess_args

from dinov3_cache.loader import chunk_copy
from dinov3_cache.loader.chunk_copy import SlabCopier, single_threaded_torch
from dinov3_cache.loader.identity import VERIFIED_CHUNKS
from dinov3_cache.paths import VolumePaths
from dinov3_cache.zarr_arrays import open_array
from preprocessed_dataloader import PreprocessedDINOv3Dataset, VolumeReadError

CHUNKINGS = {"small": "16,4,4,4", "uneven": "16,3,6,5", "yx": "16,4,16,16"}
S = 16  # the tiny geometry's volume edge
REGIONS = {
    "whole": (slice(0, S),) * 3,
    "chunk-aligned": (slice(4, 12), slice(0, 8), slice(8, 16)),
    "straddling": (slice(3, 10), slice(5, 14), slice(1, 15)),
    "at the edge": (slice(9, 16), slice(13, 16), slice(0, 16)),
    "one voxel": (slice(15, 16), slice(0, 1), slice(7, 8)),
}


@pytest.fixture(scope="module")
def caches(tmp_path_factory, tiny_model_dir) -> dict[str, Path]:
    out = {}
    for name, chunks in CHUNKINGS.items():
        out[name] = tmp_path_factory.mktemp(name)
        call_main("preprocess_volume", *preprocess_args(out[name], 0, tiny_model_dir, "--chunks", chunks), check=True)
    return out


@pytest.fixture(autouse=True)
def nothing_checked_yet():
    """Each test starts with no chunk file checked in this process (the record is process-wide)."""
    VERIFIED_CHUNKS.hashes.clear()


@pytest.fixture
def paths_taken(monkeypatch) -> dict[str, int]:
    """How often each copy path of SlabCopier ran for the features (4-d chunks)."""
    counts = {"direct": 0, "staged": 0, "mapped": 0}

    def counting(name: str, method: str):
        original = getattr(SlabCopier, method)

        def wrapper(self, *args):
            result = original(self, *args)
            counts[name] += 1 if result is not False and len(self.chunks) == 4 else 0
            return result

        monkeypatch.setattr(SlabCopier, method, wrapper)

    counting("direct", "_read_direct")
    counting("staged", "_copy_staged")
    counting("mapped", "_copy_mapped")
    return counts


def stored(cache: Path, array: str) -> torch.Tensor:
    values = open_array(VolumePaths(cache, 0).array(array)).read().result()
    return torch.from_numpy(values.astype(np.uint8) if values.dtype == np.bool_ else values)


def read_region(dataset: PreprocessedDINOv3Dataset, spatial, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    reader = dataset.resources.reader(dataset.volumes[0])
    channels = reader.shape("features")[0]
    size = [s.stop - s.start for s in spatial]
    outputs = {
        "features": torch.full((channels, *size), -1, dtype=dtype or torch.float16),
        "gt": torch.full(size, -1, dtype=stored_dtype(dataset, "gt")),
    }
    reader.finish(reader.start_read(spatial, outputs))
    return outputs


def stored_dtype(dataset, array: str) -> torch.dtype:
    return getattr(torch, dataset.volumes[0].metadata.dtypes[array])


@pytest.mark.parametrize("chunking", CHUNKINGS)
@pytest.mark.parametrize("dtype", [None, torch.float32], ids=["stored", "float32"])
def test_every_region_equals_tensorstore_on_the_first_and_later_reads(caches, chunking, dtype, paths_taken):
    cache = caches[chunking]
    dataset = PreprocessedDINOv3Dataset(cache, volume_indices=[0], num_threads=3)
    features, gt = stored(cache, "features"), stored(cache, "gt")
    assert features.dtype == torch.float16
    for attempt in ("first read: checked", "later reads: slab copies"):
        for name, spatial in REGIONS.items():
            got = read_region(dataset, spatial, dtype)
            expected = features[(slice(None), *spatial)]
            assert torch.equal(got["features"], expected.to(got["features"].dtype)), (attempt, name)
            assert torch.equal(got["gt"], gt[spatial].to(got["gt"].dtype)), (attempt, name)
            if name == "whole" and attempt.startswith("first"):
                assert paths_taken == {"direct": 0, "staged": 0, "mapped": 0}, "a file was copied before it was checked"
    if chunking == "small":
        assert paths_taken["staged"] > 0 and paths_taken["mapped"] > 0  # whole volumes staged, crops mapped
    if chunking == "uneven":
        assert paths_taken["mapped"] > 0
    if chunking == "yx":
        assert (paths_taken["direct"] > 0) == (dtype is None)  # straight into the batch only in the stored dtype


def test_short_reads_are_continued(caches, monkeypatch):
    cache = caches["small"]
    dataset = PreprocessedDINOv3Dataset(cache, volume_indices=[0], num_threads=2)
    read_region(dataset, REGIONS["whole"], None)  # checked: later reads take the slab path
    real_preadv, asked = os.preadv, []

    def short_preadv(fd, buffers, offset):
        asked.append(offset)
        return real_preadv(fd, [memoryview(buffers[0]).cast("B")[:100]], offset)

    monkeypatch.setattr(os, "preadv", short_preadv)
    got = read_region(dataset, REGIONS["whole"], None)
    assert len(asked) > 1 and torch.equal(got["features"], stored(cache, "features"))


@pytest.mark.parametrize("replace", ["rewritten in place", "replaced by rename"])
def test_a_damaged_file_is_caught_after_its_predecessor_was_checked(caches, tmp_path, replace):
    cache = tmp_path / "cache"
    shutil.copytree(caches["small"], cache)
    dataset = PreprocessedDINOv3Dataset(cache, volume_indices=[0], num_threads=2)
    for _ in range(2):
        read_region(dataset, REGIONS["straddling"], None)  # checked, then copied by the slab path
    chunk = VolumePaths(cache, 0).array("features") / "0.1.1.1"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x5A
    if replace == "rewritten in place":
        with open(chunk, "r+b") as handle:
            handle.write(bytes(data))
    else:
        staged = chunk.with_name("staged")
        staged.write_bytes(bytes(data))
        os.replace(staged, chunk)
    with pytest.raises(VolumeReadError, match=r"chunk 0\.1\.1\.1 fails its checksum"):
        read_region(dataset, REGIONS["straddling"], None)


def test_read_threads_copy_on_one_thread_and_leave_the_callers_count(caches):
    before = torch.get_num_threads()
    with ThreadPoolExecutor(1, initializer=single_threaded_torch) as pool:
        in_thread = pool.submit(torch.get_num_threads).result()
    assert torch.get_num_threads() == before
    if torch.backends.openmp.is_available():
        assert in_thread == 1


def test_slabs_are_whole_rows_of_chunks_and_bounded():
    overlaps = [((0, z, y, x), None, None) for z in range(2) for y in range(5) for x in range(3)]
    groups = chunk_copy.slab_groups(overlaps)
    assert sum(len(g) for g in groups) == len(overlaps)
    for group in groups:
        assert len({g[0][:2] for g in group}) == 1 and len(group) % 3 == 0 and len(group) <= max(3, chunk_copy.MAX_FILES)
