"""The loader on real caches written by the extraction CLI: values, masks, crops, workers, errors, benchmark CLI."""

from __future__ import annotations

import gc
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_chunk_fill_valued, preprocess_args, run_script

from dinov3_cache.loader.array_readers import read_fully
from dinov3_cache.loader.identity import VERIFIED_CHUNKS
from dinov3_cache.paths import VolumePaths
from dinov3_cache.zarr_arrays import open_array
from preprocessed_dataloader import (
    CacheError,
    PreprocessedDINOv3Dataset,
    VolumeReadError,
    collate_samples,
    create_preprocessed_dataloader,
)

SMALL_CHUNKS = ["--chunks", "16,4,4,4"]  # many chunks per tiny volume, so crops cross chunk borders
READERS = ["auto", "tensorstore"]


def build(out: Path, model_dir: Path, index: int, *extra: str) -> None:
    run_script("preprocess_volume.py", *preprocess_args(out, index, model_dir, *extra), check=True)


@pytest.fixture(scope="module")
def mixed_cache(tmp_path_factory, tiny_model_dir) -> Path:
    """Volumes 0 and 1 with masks, volume 2 without (--no-gt-extension: another fingerprint), small chunks."""
    out = tmp_path_factory.mktemp("mixed")
    build(out, tiny_model_dir, 0, *SMALL_CHUNKS)
    build(out, tiny_model_dir, 1, *SMALL_CHUNKS)
    build(out, tiny_model_dir, 2, *SMALL_CHUNKS, "--no-gt-extension")
    return out


def stored(volume_dir: Path, index: int, array: str) -> np.ndarray:
    """The array as TensorStore reads it directly (the reference for every value check)."""
    return open_array(VolumePaths(volume_dir, index).array(array)).read().result()


def copy_volume(source: Path, index: int, target: Path, new_index: int | None = None) -> None:
    """Copy a committed volume's files (arrays, and metadata unless new_index is given)."""
    target.mkdir(parents=True, exist_ok=True)
    src = VolumePaths(source, index)
    dst = VolumePaths(target, index if new_index is None else new_index)
    for path in src.existing_arrays():
        name = path.name.replace(src.name, dst.name)
        shutil.copytree(path, target / name)
    if new_index is None:
        shutil.copy(src.metadata, dst.metadata)


# ----------------------------------------------------------------------------- shapes, dtypes, values


@pytest.mark.parametrize("reader", READERS)
def test_items_have_the_stored_values_shapes_and_dtypes(built_cache, reader):
    dataset = PreprocessedDINOv3Dataset(built_cache, reader=reader)
    assert len(dataset) == 3
    for position, index in enumerate([0, 1, 2]):
        features, gt, mask = dataset[position]
        reference = stored(built_cache, index, "features")
        assert features.dtype == torch.float32 and gt.dtype == torch.int64
        assert tuple(features.shape) == reference.shape and tuple(gt.shape) == reference.shape[1:]
        assert torch.equal(features, torch.from_numpy(reference.astype(np.float32)))
        assert torch.equal(gt, torch.from_numpy(stored(built_cache, index, "gt").astype(np.int64)))
        assert mask.dtype == torch.bool
        assert torch.equal(mask, torch.from_numpy(stored(built_cache, index, "mask").astype(bool)))


def test_stored_dtype_kept_when_features_dtype_is_none(built_cache):
    features, gt, _ = PreprocessedDINOv3Dataset(built_cache, features_dtype=None, gt_dtype=None)[0]
    assert features.dtype == torch.float16
    assert gt.dtype == torch.from_numpy(stored(built_cache, 0, "gt")).dtype
    assert np.array_equal(features.numpy(), stored(built_cache, 0, "features"))


def test_zarr_v3_sharded_lz4_volume_reads_the_same_values(tmp_path, tiny_model_dir):
    build(tmp_path, tiny_model_dir, 0, "--zarr-format", "3", "--compression", "lz4", *SMALL_CHUNKS)
    features, gt, mask = PreprocessedDINOv3Dataset(tmp_path, features_dtype=None)[0]
    assert np.array_equal(features.numpy(), stored(tmp_path, 0, "features"))
    assert np.array_equal(gt.numpy(), stored(tmp_path, 0, "gt").astype(np.int64))


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_other_stored_feature_dtypes(tmp_path, tiny_model_dir, dtype):
    build(tmp_path, tiny_model_dir, 0, "--features-dtype", dtype, *SMALL_CHUNKS)
    reference = torch.from_numpy(stored(tmp_path, 0, "features").astype(np.float32))
    for reader in READERS:
        as_float32 = PreprocessedDINOv3Dataset(tmp_path, reader=reader)[0][0]
        assert torch.equal(as_float32, reference)
        kept = PreprocessedDINOv3Dataset(tmp_path, reader=reader, features_dtype=None, crop_size=(5, 6, 7))
        features = kept[0][0]
        assert features.dtype == getattr(torch, dtype)
        assert torch.equal(features.float(), reference[(slice(None), *kept.sample(0).spatial)])


def test_loader_batches_and_metadata(built_cache):
    loader = create_preprocessed_dataloader(built_cache, batch_size=2, shuffle=False, num_threads=2, return_metadata=True)
    batches = list(loader)
    assert len(loader) == 2 and len(batches) == 2
    features, gt, mask, metadata = batches[0]
    c, d, h, w = stored(built_cache, 0, "features").shape
    assert features.shape == (2, c, d, h, w) and gt.shape == (2, d, h, w) and mask.shape == (2, d, h, w)
    assert batches[1][0].shape[0] == 1  # the last, short batch
    assert [m["volume_index"] for m in metadata] == [0, 1]
    for m in metadata:
        assert m["configuration"]["fingerprint"] and m["source_dataset"]["paths"] and "feature_extraction_seconds" in m["timing"]
        assert m["sample"] == {"offset": [0, 0, 0], "shape": [d, h, w], "epoch": 0, "has_mask": True}
    assert torch.equal(features[1], torch.from_numpy(stored(built_cache, 1, "features").astype(np.float32)))


def test_dataset_returns_metadata_as_fourth_element(built_cache):
    *_, metadata = PreprocessedDINOv3Dataset(built_cache, return_metadata=True)[2]
    assert metadata["volume_index"] == 2 and metadata["volume_name"] == "volume_000002"


def test_volume_indices_select_and_order_volumes(built_cache):
    dataset = PreprocessedDINOv3Dataset(built_cache, volume_indices=[2, 0], features_dtype=None)
    assert [v.index for v in dataset.volumes] == [2, 0]
    assert np.array_equal(dataset[0][0].numpy(), stored(built_cache, 2, "features"))
    with pytest.raises(CacheError, match=r"volumes 7 are not committed"):
        PreprocessedDINOv3Dataset(built_cache, volume_indices=[0, 7])


def test_transform_is_applied_per_item(built_cache):
    def transform(features, gt, mask):
        return features * 2, gt + 1, mask

    loader = create_preprocessed_dataloader(built_cache, batch_size=2, transform=transform, volume_indices=[0, 1])
    features, gt, _ = next(iter(loader))
    assert torch.equal(features[0], torch.from_numpy(stored(built_cache, 0, "features").astype(np.float32)) * 2)
    assert torch.equal(gt[1], torch.from_numpy(stored(built_cache, 1, "gt").astype(np.int64)) + 1)


def test_transform_output_dtypes_reach_training_unchanged(built_cache):
    def widen(features, gt, mask):
        assert features.dtype == torch.float16 and gt.dtype == torch.int32  # the transform sees the asked dtypes
        return features.float() * 2, gt.long(), mask

    options = dict(features_dtype=torch.float16, gt_dtype=torch.int32, transform=widen, volume_indices=[0, 1])
    reference = torch.from_numpy(stored(built_cache, 0, "features")).float() * 2
    features, gt, _ = PreprocessedDINOv3Dataset(built_cache, **options)[0]
    assert features.dtype == torch.float32 and gt.dtype == torch.int64
    assert torch.equal(features, reference)
    for batch_features, batch_gt, _ in create_preprocessed_dataloader(built_cache, batch_size=2, **options):
        assert batch_features.dtype == torch.float32 and batch_gt.dtype == torch.int64
        assert torch.equal(batch_features[0], reference)
        assert torch.equal(batch_gt[1], torch.from_numpy(stored(built_cache, 1, "gt").astype(np.int64)))


# ----------------------------------------------------------------------------- masks


def test_masks_mixed_in_one_batch_become_all_valid_for_volumes_without_one(mixed_cache):
    loader = create_preprocessed_dataloader(mixed_cache, batch_size=3, allow_mixed_configurations=True)
    features, gt, mask = next(iter(loader))
    assert mask.dtype == torch.bool and mask.shape == gt.shape
    assert torch.equal(mask[0], torch.from_numpy(stored(mixed_cache, 0, "mask").astype(bool)))
    assert not mask[0].all()  # the stored mask has invalid voxels, so the check above means something
    assert mask[2].all()


def test_batch_without_any_mask_has_mask_none(mixed_cache):
    loader = create_preprocessed_dataloader(mixed_cache, batch_size=2, volume_indices=[2])
    features, gt, mask = next(iter(loader))
    assert mask is None and features.shape[0] == 1
    assert PreprocessedDINOv3Dataset(mixed_cache, volume_indices=[2])[0][2] is None


def test_collate_samples_for_a_plain_torch_dataloader(mixed_cache):
    dataset = PreprocessedDINOv3Dataset(mixed_cache, allow_mixed_configurations=True, return_metadata=True)
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, collate_fn=collate_samples)
    features, gt, mask, metadata = next(iter(loader))
    assert features.shape[0] == 3 and mask[2].all() and [m["volume_index"] for m in metadata] == [0, 1, 2]


def test_mixed_fingerprints_are_refused_unless_allowed(mixed_cache):
    with pytest.raises(CacheError, match="2 different configurations") as refused:
        PreprocessedDINOv3Dataset(mixed_cache)
    assert "allow_mixed_configurations" in str(refused.value) and "volumes 0, 1" in str(refused.value)
    assert len(PreprocessedDINOv3Dataset(mixed_cache, allow_mixed_configurations=True)) == 3
    assert len(PreprocessedDINOv3Dataset(mixed_cache, volume_indices=[0, 1])) == 2


# ----------------------------------------------------------------------------- crops


@pytest.mark.parametrize("reader", READERS)
def test_crops_are_reproducible_inside_bounds_and_hold_the_stored_values(mixed_cache, reader):
    crop = (7, 9, 5)
    kwargs = dict(volume_indices=[0, 1], crop_size=crop, samples_per_volume=4, seed=3, features_dtype=None, reader=reader)
    first, second = PreprocessedDINOv3Dataset(mixed_cache, **kwargs), PreprocessedDINOv3Dataset(mixed_cache, **kwargs)
    assert len(first) == 8
    offsets = set()
    for i in range(len(first)):
        sample = first.sample(i)
        assert sample == second.sample(i)
        volume_shape = sample.volume.spatial_shape
        assert all(0 <= o and o + c <= s for o, c, s in zip(sample.offset, crop, volume_shape, strict=False))
        offsets.add(sample.offset)
        features, gt, mask = first[i]
        assert torch.equal(features, second[i][0])
        region = sample.spatial
        index = sample.volume.index
        assert np.array_equal(features.numpy(), stored(mixed_cache, index, "features")[(slice(None), *region)])
        assert np.array_equal(gt.numpy(), stored(mixed_cache, index, "gt")[region].astype(np.int64))
        assert np.array_equal(mask.numpy(), stored(mixed_cache, index, "mask")[region].astype(bool))
    assert len(offsets) > 4  # random, not one fixed corner
    assert PreprocessedDINOv3Dataset(mixed_cache, **{**kwargs, "seed": 4}).sample(0).offset != first.sample(0).offset or \
        PreprocessedDINOv3Dataset(mixed_cache, **{**kwargs, "seed": 4}).sample(1).offset != first.sample(1).offset


def test_loader_draws_new_crops_each_epoch_and_repeats_with_the_seed(mixed_cache):
    def epochs(seed):
        loader = create_preprocessed_dataloader(
            mixed_cache, batch_size=2, shuffle=True, volume_indices=[0, 1], crop_size=(4, 4, 4),
            samples_per_volume=3, seed=seed, return_metadata=True,
        )
        return [[(m["volume_index"], tuple(m["sample"]["offset"])) for b in loader for m in b[3]] for _ in range(2)]

    run_a, run_b = epochs(11), epochs(11)
    assert run_a == run_b
    assert run_a[0] != run_a[1]
    assert sorted(v for v, _ in run_a[0]) == [0, 0, 0, 1, 1, 1]


def test_crop_larger_than_a_volume_is_refused(built_cache):
    with pytest.raises(CacheError, match="does not fit volume 0"):
        PreprocessedDINOv3Dataset(built_cache, crop_size=(64, 4, 4))


# ----------------------------------------------------------------------------- workers, prefetch, devices


def test_two_spawned_workers_give_the_same_batches_as_threads(mixed_cache):
    kwargs = dict(batch_size=2, shuffle=True, volume_indices=[0, 1], crop_size=(8, 8, 8), samples_per_volume=2, seed=5)
    with_threads = list(create_preprocessed_dataloader(mixed_cache, num_workers=0, **kwargs))
    with_workers = list(create_preprocessed_dataloader(mixed_cache, num_workers=2, **kwargs))
    assert len(with_workers) == len(with_threads) == 2
    for a, b in zip(with_threads, with_workers, strict=False):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=False))


def test_fork_is_refused_for_workers(built_cache):
    with pytest.raises(CacheError, match="TensorStore aborts in fork"):
        create_preprocessed_dataloader(built_cache, num_workers=1, multiprocessing_context="fork")


def test_breaking_out_of_a_loop_stops_the_prefetch_thread(built_cache):
    loader = create_preprocessed_dataloader(built_cache, batch_size=1, prefetch_batches=2)
    iterator = iter(loader)
    next(iterator)
    iterator.close()
    assert not iterator.thread.is_alive()


def test_an_abandoned_iterator_stops_its_prefetch_thread(built_cache):
    loader = create_preprocessed_dataloader(built_cache, batch_size=1, prefetch_batches=1)
    iterator = iter(loader)
    next(iterator)
    thread = iterator.thread
    del iterator  # a loop left with break: nothing closes it explicitly
    gc.collect()
    thread.join(timeout=30)
    assert not thread.is_alive()


def test_device_cpu_delivers_cpu_tensors_in_the_asked_dtypes(built_cache):
    loader = create_preprocessed_dataloader(built_cache, batch_size=2, device="cpu", prefetch_batches=0)
    features, gt, mask = next(iter(loader))
    assert all(t.device.type == "cpu" for t in (features, gt, mask))
    assert features.dtype == torch.float32 and gt.dtype == torch.int64 and features.shape[0] == 2
    assert torch.equal(features[1], torch.from_numpy(stored(built_cache, 1, "features").astype(np.float32)))


def test_pin_memory_warns_without_a_gpu(built_cache, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loader = create_preprocessed_dataloader(built_cache, batch_size=1, pin_memory=True)
    warned = [w for w in caught if "pin_memory=True but no CUDA GPU is visible" in str(w.message)]
    features, gt, mask = next(iter(loader))
    assert torch.equal(features[0], torch.from_numpy(stored(built_cache, 0, "features").astype(np.float32)))
    assert len(warned) == 1 and not features.is_pinned()


@pytest.mark.gpu
def test_pin_memory_pins_with_a_gpu(built_cache):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loader = create_preprocessed_dataloader(built_cache, batch_size=1, pin_memory=True)
    features, gt, mask = next(iter(loader))
    assert not [w for w in caught if "no CUDA GPU" in str(w.message)]
    assert all(t.is_pinned() for t in (features, gt, mask))


def test_device_cuda_is_refused_without_a_gpu(built_cache, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(CacheError, match="no CUDA GPU"):
        create_preprocessed_dataloader(built_cache, device="cuda")


@pytest.mark.gpu
def test_device_cuda_delivers_gpu_tensors(built_cache):
    loader = create_preprocessed_dataloader(built_cache, batch_size=1, device="cuda")
    features, gt, mask = next(iter(loader))
    assert all(t.device.type == "cuda" for t in (features, gt, mask))
    assert features.dtype == torch.float32 and gt.dtype == torch.int64
    assert torch.equal(features[0].cpu(), torch.from_numpy(stored(built_cache, 0, "features").astype(np.float32)))


# ----------------------------------------------------------------------------- visibility and damage


def test_a_volume_without_metadata_is_invisible(built_cache, tmp_path):
    copy_volume(built_cache, 0, tmp_path)
    copy_volume(built_cache, 1, tmp_path, new_index=5)  # arrays in place, metadata never written: a killed run
    (VolumePaths(tmp_path, 6).staging / "features.zarr").mkdir(parents=True)
    dataset = PreprocessedDINOv3Dataset(tmp_path)
    assert [v.index for v in dataset.volumes] == [0]
    with pytest.raises(CacheError, match="volumes 5 are not committed"):
        PreprocessedDINOv3Dataset(tmp_path, volume_indices=[5])


def test_empty_or_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(CacheError, match="no preprocessed volumes found"):
        PreprocessedDINOv3Dataset(tmp_path)
    with pytest.raises(CacheError, match="does not exist"):
        PreprocessedDINOv3Dataset(tmp_path / "nowhere")


def first_feature_chunk(volume_dir: Path, index: int) -> Path:
    return VolumePaths(volume_dir, index).array("features") / "0.0.0.0"


@pytest.mark.parametrize("reader", READERS)
def test_a_truncated_chunk_raises_an_error_naming_volume_and_array(built_cache, tmp_path, reader):
    copy_volume(built_cache, 1, tmp_path)
    chunk = first_feature_chunk(tmp_path, 1)
    chunk.write_bytes(chunk.read_bytes()[:100])
    dataset = PreprocessedDINOv3Dataset(tmp_path, reader=reader)
    with pytest.raises(VolumeReadError, match=r"volume 1 array 'features'") as failed:
        dataset[0]
    assert "preprocess_volume.py --volume-index 1 --overwrite" in str(failed.value)
    loader = create_preprocessed_dataloader(tmp_path, batch_size=1, reader=reader)
    with pytest.raises(VolumeReadError, match=r"volume 1 array 'features'"):
        list(loader)


@pytest.mark.parametrize("reader", READERS)
def test_a_missing_chunk_the_writer_wrote_is_refused_naming_it(mixed_cache, tmp_path, reader):
    copy_volume(mixed_cache, 0, tmp_path)
    (VolumePaths(tmp_path, 0).array("features") / "1.2.3.0").unlink()
    with pytest.raises(VolumeReadError, match=r"volume 0 array 'features'.*chunk 1\.2\.3\.0.*the writer wrote data there") as failed:
        PreprocessedDINOv3Dataset(tmp_path, reader=reader)[0]
    assert "preprocess_volume.py --volume-index 0 --overwrite" in str(failed.value)


@pytest.mark.parametrize("reader", READERS)
def test_a_chunk_the_writer_skipped_reads_as_the_fill_value(mixed_cache, tmp_path, reader):
    copy_volume(mixed_cache, 0, tmp_path)
    make_chunk_fill_valued(tmp_path, 0, "features", (1, 2, 3, 0))
    assert not (VolumePaths(tmp_path, 0).array("features") / "1.2.3.0").exists()
    features = PreprocessedDINOv3Dataset(tmp_path, reader=reader, features_dtype=None)[0][0]
    assert torch.equal(features, torch.from_numpy(stored(tmp_path, 0, "features")))
    assert not features[16:32, 8:12, 12:16, 0:4].any() and features[0:16, 8:12, 12:16, 0:4].any()


def short_reads(monkeypatch, at_most: int) -> list[int]:
    """Make every os.readv return at most `at_most` bytes, as NFS or Lustre may; the sizes asked for are recorded."""
    real_readv, asked = os.readv, []

    def short_readv(fd, buffers):
        asked.append(sum(memoryview(b).nbytes for b in buffers))
        return real_readv(fd, [memoryview(buffers[0]).cast("B")[:at_most]])

    monkeypatch.setattr(os, "readv", short_readv)
    return asked


def test_short_reads_are_continued_until_the_chunk_is_complete(built_cache, monkeypatch):
    VERIFIED_CHUNKS.hashes.clear()  # whole reads (of files not checked yet); later reads: test_chunk_copy.py
    asked = short_reads(monkeypatch, at_most=1000)
    dataset = PreprocessedDINOv3Dataset(built_cache, reader="auto", features_dtype=None, gt_dtype=None)
    features, gt, mask = dataset[1]
    chunk_bytes = first_feature_chunk(built_cache, 1).stat().st_size
    assert chunk_bytes > 2000 and max(asked) == chunk_bytes and chunk_bytes - 1000 in asked  # continued, not refused
    assert np.array_equal(features.numpy(), stored(built_cache, 1, "features"))
    assert np.array_equal(gt.numpy(), stored(built_cache, 1, "gt"))
    assert np.array_equal(mask.numpy(), stored(built_cache, 1, "mask").astype(bool))


def test_read_fully_stops_at_the_end_of_the_file(tmp_path, monkeypatch):
    short_reads(monkeypatch, at_most=1000)
    path = tmp_path / "chunk"
    path.write_bytes(bytes(range(250)) * 10)
    buffer = np.zeros(4000, np.uint8)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert read_fully(fd, buffer) == 2500
    finally:
        os.close(fd)
    assert buffer[:2500].tobytes() == path.read_bytes() and not buffer[2500:].any()


def test_a_truncated_chunk_is_damage_even_with_short_reads(built_cache, tmp_path, monkeypatch):
    copy_volume(built_cache, 1, tmp_path)
    chunk = first_feature_chunk(tmp_path, 1)
    chunk.write_bytes(chunk.read_bytes()[:-7])
    short_reads(monkeypatch, at_most=1000)
    with pytest.raises(VolumeReadError, match=r"volume 1 array 'features'.*chunk 0\.0\.0\.0"):
        PreprocessedDINOv3Dataset(tmp_path, reader="auto")[0]


def test_a_corrupt_compressed_chunk_raises_an_error_naming_the_volume(tmp_path, tiny_model_dir):
    build(tmp_path, tiny_model_dir, 4, "--compression", "zstd")
    first_feature_chunk(tmp_path, 4).write_bytes(b"\x00garbage" * 50)
    with pytest.raises(VolumeReadError, match=r"volume 4 array 'features'"):
        PreprocessedDINOv3Dataset(tmp_path)[0]


def test_a_missing_array_raises_an_error_naming_the_volume(built_cache, tmp_path):
    copy_volume(built_cache, 2, tmp_path)
    shutil.rmtree(VolumePaths(tmp_path, 2).array("gt"))
    with pytest.raises(VolumeReadError, match=r"volume 2 array 'gt'"):
        PreprocessedDINOv3Dataset(tmp_path)[0]


def test_worker_errors_keep_the_volume_name(built_cache, tmp_path):
    copy_volume(built_cache, 0, tmp_path)
    chunk = first_feature_chunk(tmp_path, 0)
    chunk.write_bytes(chunk.read_bytes()[:10])
    with pytest.raises(Exception, match=r"volume 0 array 'features'"):
        list(create_preprocessed_dataloader(tmp_path, batch_size=1, num_workers=1))


# ----------------------------------------------------------------------------- benchmark CLI


def file_system_of(path: Path) -> str:
    mounts = [line.split()[1:3] for line in Path("/proc/mounts").read_text().splitlines()]
    matching = [(len(m), kind) for m, kind in mounts if str(path.resolve()).startswith(m.rstrip("/") + "/")]
    return max(matching)[1] if matching else "unknown"


def test_benchmark_cli_prints_every_field(built_cache):
    result = run_script(
        "preprocessed_dataloader.py", "--preprocessed-dir", built_cache, "--batch-size", "2", "--num-batches", "5",
        "--num-threads", "2", check=True,
    )
    out = result.stdout
    if file_system_of(built_cache) not in ("tmpfs", "ramfs"):  # memory file systems cannot evict
        assert "Page cache before the first batch: 0.0 of" in out
    for field in [
        "Page cache before the first batch:", "First batch (cold load):", "Features shape: torch.Size([2,",
        "GT shape: torch.Size([2,", "Mask shape: torch.Size([2,", "Load time:", "Batch 2:", "Batch 5:",
        "Benchmark Results:", "Bytes per batch:", "Cold load (first batch):", "Warm loads (cached)", "Mean:", "Std:",
        "Min:", "Max:", "Throughput:", "GB/s", "Speedup vs cold:",
    ]:
        assert field in out, f"{field!r} missing from:\n{out}"


@pytest.mark.parametrize("extra, message", [
    (["--preprocessed-dir", "nowhere"], "error: --preprocessed-dir nowhere is not a directory"),
    (["--device", "bogus"], "error: --device 'bogus' is not a device"),
    (["--batch-size", "0"], "error: --batch-size, --num-batches and --samples-per-volume must be at least 1"),
    (["--samples-per-volume", "0"], "error: --batch-size, --num-batches and --samples-per-volume must be at least 1"),
])
def test_benchmark_cli_bad_argument_is_one_line(tmp_path, extra, message):
    result = run_script("preprocessed_dataloader.py", "--preprocessed-dir", tmp_path, *extra)
    assert result.returncode == 2  # bad arguments (docs/exit-status.md)
    assert result.stderr.startswith(message) and "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_benchmark_cli_names_options_not_python_keywords(built_cache):
    # the loader's error names its keyword (volume_indices); the command names the option
    result = run_script("preprocessed_dataloader.py", "--preprocessed-dir", built_cache, "--volume-indices", "77")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: volumes 77 are not committed") and "--volume-indices" in line, line
    assert "volume_indices" not in line


def test_batch_memory_is_reused_only_when_nothing_holds_it(built_cache):
    dataset = PreprocessedDINOv3Dataset(built_cache, features_dtype=None)
    first = dataset.read_batch([0]).features
    address, view = first.data_ptr(), first[0]
    del first
    second = dataset.read_batch([1]).features
    assert second.data_ptr() != address  # a view of the first batch is alive
    as_numpy = second.numpy()
    del second
    third = dataset.read_batch([2]).features
    assert third.data_ptr() not in (address, as_numpy.ctypes.data)
    assert np.array_equal(view.numpy(), stored(built_cache, 0, "features"))
    assert np.array_equal(as_numpy[0], stored(built_cache, 1, "features"))
    del view, third
    assert dataset.read_batch([2]).features.data_ptr() == address  # released: reused, no new page faults


def vm_flags(address: int) -> list[str]:
    """The VmFlags of the memory area of this process holding `address` (/proc/self/smaps)."""
    area = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        first = line.split(" ", 1)[0]
        if "-" in first and ":" not in first:
            start, stop = (int(x, 16) for x in first.split("-"))
            area = start <= address < stop
        elif area and line.startswith("VmFlags:"):
            return line.split()[1:]
    raise AssertionError(f"no memory area holds {address:#x}")


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="huge pages are asked for on Linux only")
def test_large_batch_tensors_start_on_a_huge_page_and_ask_for_huge_pages():
    from dinov3_cache.loader.buffers import HUGE_PAGE, HUGE_PAGES_FROM, BatchBuffers, empty_tensor

    shape = (3, HUGE_PAGES_FROM // 4 // 3 + 5)  # float32, not a whole number of huge pages
    tensor = empty_tensor(shape, torch.float32, pin_memory=False)
    assert tensor.shape == shape and tensor.dtype == torch.float32 and tensor.is_contiguous()
    assert tensor.data_ptr() % HUGE_PAGE == 0 and tensor._base is None
    tensor.fill_(2.0)
    assert float(tensor.sum()) == 2.0 * tensor.numel()
    assert "hg" in vm_flags(tensor.data_ptr())  # madvise(MADV_HUGEPAGE) on its memory
    small = empty_tensor((16,), torch.float32, pin_memory=False)  # as torch gives it: no alignment slack
    assert small.untyped_storage().nbytes() == 64 and tensor.untyped_storage().nbytes() > tensor.numel() * 4
    buffers = BatchBuffers()
    first = buffers.empty(shape, torch.float32, False)
    address = first.data_ptr()
    del first
    assert buffers.empty(shape, torch.float32, False).data_ptr() == address  # reused once free
