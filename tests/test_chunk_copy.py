"""The raw reader's copy paths (dinov3_cache/loader/chunk_copy.py) give TensorStore's values:
whole volumes and crops at every offset class (chunk-aligned, straddling, at the volume edge),
in the stored dtype and cast, for the default-like chunks (staged slab copy, mapped copy),
chunks that do not divide the volume, and chunks spanning y and x (read straight into the
batch); the first read of a file is still checked; kept mappings are bounded, dropped before an
eviction, and never outlive the file they map. Real caches from the CLI."""

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
from dinov3_cache.loader.identity import VERIFIED_CHUNKS, chunk_file_identity
from dinov3_cache.loader.mapped_files import MAPPED_FILES
from dinov3_cache.loader.page_cache import evict_from_page_cache, volume_files
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


def open_chunk_file(path: Path, data: np.ndarray, src, dst) -> chunk_copy.OpenChunk:
    path.write_bytes(data.tobytes())
    fd = os.open(path, os.O_RDONLY)
    return chunk_copy.OpenChunk(fd, chunk_file_identity(os.fstat(fd)), (0,) * data.ndim, src, dst)


@pytest.mark.parametrize(("offset", "wide"), [(8, True), (3, False)], ids=["aligned: 16-byte elements", "misaligned"])
def test_mapped_copies_keep_every_bit_pattern(tmp_path, offset, wide, monkeypatch):
    """Chunk rows copied from the mapped file as 16-byte elements (whole, aligned rows) or as they
    are: every float16 bit pattern (NaN payloads, infinities, subnormals, -0) arrives unchanged."""
    widened = []
    real = chunk_copy.widened
    monkeypatch.setattr(chunk_copy, "widened", lambda s, t: widened.append(real(s, t)[0].dtype) or real(s, t))
    patterns = np.arange(1 << 16, dtype=np.uint16)
    chunks = (4, 16, 8, 8)  # 4096 values per chunk: 16 chunk files hold every pattern
    out = torch.zeros(4, 16 * 16, 8, 24, dtype=torch.float16)
    files = []
    for i in range(16):
        data = patterns[i * 4096 : (i + 1) * 4096].reshape(chunks)
        dst = (slice(0, 4), slice(16 * i, 16 * i + 16), slice(0, 8), slice(offset, offset + 8))
        files.append(open_chunk_file(tmp_path / f"chunk{i}", data, tuple(slice(0, c) for c in chunks), dst))
    try:
        chunk_copy.SlabCopier(chunks, torch.float16)._copy_mapped(files, out)
    finally:
        for f in files:
            os.close(f.fd)
    got = out[..., offset : offset + 8].view(torch.int16).numpy().view(np.uint16)
    expected = np.concatenate([patterns[i * 4096 : (i + 1) * 4096].reshape(chunks) for i in range(16)], axis=1)
    assert np.array_equal(got, expected)
    assert set(widened) == {torch.complex128 if wide else torch.float16}


def test_kept_mappings_are_bounded_and_dropped_before_eviction(caches, monkeypatch):
    cache = caches["small"]
    dataset = PreprocessedDINOv3Dataset(cache, volume_indices=[0], num_threads=2)
    bound = 40_000  # two gt chunk files (16^3 int32) and a few feature chunk files (2 KiB)
    monkeypatch.setattr(MAPPED_FILES, "max_bytes", bound)
    monkeypatch.setattr(MAPPED_FILES, "max_files", 6)
    MAPPED_FILES.clear()
    features = stored(cache, "features")
    for _ in range(2):  # checked, then copied from mappings
        for name, spatial in REGIONS.items():
            got = read_region(dataset, spatial, None)
            assert torch.equal(got["features"], features[(slice(None), *spatial)]), name
            assert MAPPED_FILES.nbytes <= bound and len(MAPPED_FILES.mapped) <= 6
    assert MAPPED_FILES.mapped
    evict_from_page_cache(volume_files(dataset.volumes))
    assert not MAPPED_FILES.mapped and MAPPED_FILES.nbytes == 0  # a mapped page cannot be dropped


def test_a_rewritten_file_is_mapped_again_not_served_from_the_old_mapping(caches, tmp_path):
    """Unchecked reads (verify_checksums=False) of a file kept mapped, then replaced under the
    same path by other values, and then rewritten in place: each read returns what the file
    holds now."""
    cache = tmp_path / "cache"
    shutil.copytree(caches["small"], cache)
    dataset = PreprocessedDINOv3Dataset(cache, volume_indices=[0], num_threads=2, verify_checksums=False)
    spatial = REGIONS["straddling"]
    expected = stored(cache, "features")[(slice(None), *spatial)]
    assert torch.equal(read_region(dataset, spatial, None)["features"], expected)
    chunk = VolumePaths(cache, 0).array("features") / "0.1.1.1"
    assert any(key[0] == chunk_file_identity(os.stat(chunk)) for key in MAPPED_FILES.mapped)
    for change in ("replaced by rename", "rewritten in place"):
        values = np.frombuffer(chunk.read_bytes(), dtype=np.float16) + np.float16(1)
        if change == "replaced by rename":
            chunk.with_name("staged").write_bytes(values.tobytes())
            os.replace(chunk.with_name("staged"), chunk)
        else:
            with open(chunk, "r+b") as handle:
                handle.write(values.tobytes())
        assert torch.equal(read_region(dataset, spatial, None)["features"], stored(cache, "features")[(slice(None), *spatial)])
        assert not torch.equal(read_region(dataset, spatial, None)["features"], expected), change
        expected = stored(cache, "features")[(slice(None), *spatial)]
