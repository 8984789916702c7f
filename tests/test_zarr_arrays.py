"""Codecs and chunk shapes of the arrays written through TensorStore, as other readers see them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dinov3_cache.chunk_files import chunk_file_map, present_files
from dinov3_cache.zarr_arrays import (
    StorageOptions,
    chunk_slices,
    clamp_chunks,
    codec_description,
    create_array,
    feature_chunks,
    open_array,
    read_array_metadata,
    read_attributes,
    shard_shape,
    ts_context,
    write_unit,
)

SHAPE, CHUNKS = (4, 16, 16, 16), (2, 4, 4, 4)
ITEMSIZES = {"float16": 2, "float32": 4, "uint8": 1, "uint64": 8}


def write_array(path: Path, dtype: str, storage: StorageOptions) -> np.ndarray:
    # smooth values with repeated high bytes: shuffling matters for them
    data = (np.arange(np.prod(SHAPE)).reshape(SHAPE) % 251).astype(dtype)
    store = create_array(path, SHAPE, dtype, CHUNKS, storage, ts_context(2), {}, ["c", "z", "y", "x"])
    store.write(data).result()
    return data


def inner_codecs(zarr_json: dict) -> list[dict]:
    codecs = zarr_json["codecs"]
    if codecs[0]["name"] == "sharding_indexed":
        return codecs[0]["configuration"]["codecs"]
    return codecs


@pytest.mark.parametrize("dtype", list(ITEMSIZES))
def test_v2_lz4_is_blosc_byte_shuffle(tmp_path, dtype):
    import numcodecs
    import zarr

    path = tmp_path / "a.zarr"
    data = write_array(path, dtype, StorageOptions(zarr_format=2, compression="lz4"))
    compressor = json.loads((path / ".zarray").read_text())["compressor"]
    assert compressor["id"] == "blosc" and compressor["cname"] == "lz4"
    assert compressor["shuffle"] == numcodecs.Blosc.SHUFFLE == 1
    assert "typesize" not in compressor  # zarr v2 readers take it from the dtype
    recorded = codec_description(StorageOptions(zarr_format=2, compression="lz4"), SHAPE, CHUNKS, dtype)["compressor"]
    assert recorded == {**compressor, "typesize": ITEMSIZES[dtype]}
    np.testing.assert_array_equal(zarr.open_array(str(path), mode="r")[...], data)


@pytest.mark.parametrize("dtype", list(ITEMSIZES))
def test_v3_lz4_is_blosc_byte_shuffle_with_the_dtype_itemsize(tmp_path, dtype):
    import zarr

    path = tmp_path / "a.zarr"
    storage = StorageOptions(zarr_format=3, compression="lz4")
    data = write_array(path, dtype, storage)
    on_disk = json.loads((path / "zarr.json").read_text())
    blosc = [c for c in inner_codecs(on_disk) if c["name"] == "blosc"]
    assert len(blosc) == 1
    assert blosc[0]["configuration"]["shuffle"] == "shuffle"
    assert blosc[0]["configuration"]["typesize"] == ITEMSIZES[dtype]
    assert codec_description(storage, SHAPE, CHUNKS, dtype)["codecs"] == on_disk["codecs"]
    np.testing.assert_array_equal(zarr.open_array(str(path), mode="r")[...], data)


@pytest.mark.parametrize("zarr_format", [2, 3])
@pytest.mark.parametrize("dtype", list(ITEMSIZES))
def test_zstd_round_trips_and_is_recorded_as_written(tmp_path, zarr_format, dtype):
    import zarr

    path = tmp_path / "a.zarr"
    storage = StorageOptions(zarr_format=zarr_format, compression="zstd")
    data = write_array(path, dtype, storage)
    recorded = codec_description(storage, SHAPE, CHUNKS, dtype)
    if zarr_format == 2:
        assert recorded["compressor"] == json.loads((path / ".zarray").read_text())["compressor"] == {"id": "zstd", "level": 3}
    else:
        assert recorded["codecs"] == json.loads((path / "zarr.json").read_text())["codecs"]
    np.testing.assert_array_equal(zarr.open_array(str(path), mode="r")[...], data)
    np.testing.assert_array_equal(open_array(path).read().result(), data)


def test_bfloat16_lz4_typesize_is_two(tmp_path):
    path = tmp_path / "a.zarr"
    store = create_array(path, SHAPE, "bfloat16", CHUNKS, StorageOptions(zarr_format=3, compression="lz4"),
                         ts_context(2), {}, ["c", "z", "y", "x"])
    values = np.linspace(-3, 3, np.prod(SHAPE)).reshape(SHAPE).astype(store.dtype.numpy_dtype)
    store.write(values).result()
    blosc = [c for c in inner_codecs(json.loads((path / "zarr.json").read_text())) if c["name"] == "blosc"]
    assert blosc[0]["configuration"]["typesize"] == 2
    np.testing.assert_array_equal(open_array(path).read().result(), values)


def test_lz4_byte_shuffle_compresses_smooth_float32_better_than_none(tmp_path):
    sizes = {}
    for compression in ("none", "lz4"):
        path = tmp_path / f"{compression}.zarr"
        write_array(path, "float32", StorageOptions(zarr_format=2, compression=compression))
        sizes[compression] = sum(p.stat().st_size for p in path.glob("*.*.*.*"))
    assert sizes["lz4"] < sizes["none"] / 2


@pytest.mark.parametrize("shape, requested, expected", [
    ((384, 64, 64, 64), (256, 16, 16, 16), (192, 16, 16, 16)),  # the largest divisor of C not above the request
    ((32, 16, 16, 16), (24, 8, 8, 8), (16, 8, 8, 8)),
    ((1024, 8, 100, 100), (256, 16, 16, 16), (256, 8, 16, 16)),  # spatial sizes clamped to the array
    ((7, 4, 4, 4), (256, 16, 16, 16), (7, 4, 4, 4)),
    ((7, 4, 4, 4), (3, 2, 2, 2), (1, 2, 2, 2)),  # a prime channel count: channel chunk 1
])
def test_feature_chunks(shape, requested, expected):
    chunks = feature_chunks(shape, requested)
    assert chunks == expected
    assert shape[0] % chunks[0] == 0


def test_clamp_chunks():
    assert clamp_chunks((10, 40, 5), (32, 32, 32)) == (10, 32, 5)


def test_write_unit_is_the_chunk_in_v2_and_the_shard_in_v3():
    shape, chunks = (1024, 128, 128, 128), (256, 16, 16, 16)
    assert write_unit(shape, chunks, 2) == chunks
    assert write_unit(shape, chunks, 3) == shard_shape(shape, chunks) == (256, 64, 64, 64)
    # fewer chunks per shard in a smaller array, but always whole chunks (zarr v3): the array's edge cuts the shard
    assert write_unit((32, 40, 40, 40), (16, 16, 16, 16), 3) == (16, 48, 48, 48)
    assert write_unit((32, 32, 32, 32), (16, 16, 16, 16), 3) == (16, 32, 32, 32)


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_one_parse_of_the_metadata_gives_the_attributes_and_the_chunk_files(tmp_path, zarr_format):
    path = tmp_path / "a.zarr"
    attributes = {"voxel_size": [8, 8, 8], "dinov3_cache": {"commit_id": "abc"}}
    store = create_array(path, SHAPE, "float16", CHUNKS, StorageOptions(zarr_format=zarr_format), ts_context(2), attributes, ["c", "z", "y", "x"])
    store.write(np.ones(SHAPE, "float16")).result()
    array = read_array_metadata(path)
    assert read_attributes(path, array) == read_attributes(path) == attributes
    file_map = chunk_file_map(array)
    files = {file_map.chunk_file(grid_index) for grid_index, _ in chunk_slices(SHAPE, CHUNKS)}
    assert files == set(present_files(path))  # every chunk's file, and no other
    assert len(files) == (128 if zarr_format == 2 else 2)  # v3: one shard per channel chunk


@pytest.mark.parametrize("dim", [48, 80])
def test_zarr_v3_volumes_whose_size_is_not_a_multiple_of_the_chunk(tmp_path, tiny_model_dir, dim):
    """48 or 80 voxels in chunks of 32 (the labels' and the features' spatial chunk): the shard
    is a whole number of chunks, the volume is written, verified and read as in zarr v2."""
    from conftest import call_main, preprocess_args

    from dinov3_cache.loader.dataset import PreprocessedDINOv3Dataset

    features = {}
    for zarr_format in ("2", "3"):
        out = tmp_path / f"v{zarr_format}"
        args = preprocess_args(out, 0, tiny_model_dir, "--output-image-dim", str(dim), "--zarr-format", zarr_format)
        call_main("preprocess_volume", *args, check=True)
        call_main("check_preprocessing", "--output-dir", out, "--verify-all", check=True)
        features[zarr_format] = PreprocessedDINOv3Dataset(out, [0])[0][0].numpy()
    assert features["3"].shape == (32, dim, dim, dim)
    np.testing.assert_array_equal(features["2"], features["3"])
