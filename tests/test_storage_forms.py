"""The storage forms are open: a third form, declared and registered in this test alone (dense
float32 with whole-channel chunks of 4^3 voxels), is written by the real extraction with the
random tiny model, verified by the audit, previewed, and loaded through PreprocessedDINOv3Dataset."""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from dinov3_cache.audit.verify import verify_volume
from dinov3_cache.errors import CacheToolError
from dinov3_cache.loader.dataset import PreprocessedDINOv3Dataset
from dinov3_cache.paths import VolumePaths
from dinov3_cache.storage import FeatureStorage, register_storage, unregister_storage
from dinov3_cache.storage.dense import write_dense_slab
from dinov3_cache.zarr_arrays import clamp_chunks
from tests.conftest import call_main, preprocess_args

TOY = "toy-dense32"


class WholeChannelDense(FeatureStorage):
    """Dense features in chunks of every channel by 4^3 voxels: a crop reads whole channel runs."""

    name = TOY
    description = "dense features, every channel in one chunk"
    array_name = "features"
    default_chunks = (0, 4, 4, 4)  # the channel entry is ignored: a chunk holds all channels
    chunk_axes = "-,Z,Y,X"
    dimension_names = ("c", "z", "y", "x")

    def array_shape(self, channels, out_dim, planes, grid_size):
        return (channels, out_dim, out_dim, out_dim)

    def array_chunks(self, shape, requested):
        return (shape[0], *clamp_chunks(shape[1:], requested[1:]))

    def write_features(self, tokens, output):
        axis = tokens.streaming_axis
        for grids, start, stop in tokens.streamed_slabs(output.unit[1 + axis]):
            write_dense_slab(grids, start, stop, axis, tokens.out_dim, output)

    def read_region(self, store, planes: Sequence[str], region):
        return store[(slice(None), *(slice(lo, hi) for lo, hi in region))].read().result().astype("float32")

    def start_read(self, reader, spatial, out, allocate=None):
        return None, [reader.start_region(self.array_name, (slice(0, reader.shape(self.array_name)[0]), *spatial), out)]


@pytest.fixture(scope="module")
def toy_form():
    form = register_storage(WholeChannelDense())
    yield form
    unregister_storage(TOY)


@pytest.fixture(scope="module")
def caches(toy_form, tmp_path_factory, tiny_model_dir) -> tuple[Path, Path]:
    """Volumes 0 and 1 in the toy form, and the same volumes dense, both float32."""
    toy, dense = tmp_path_factory.mktemp("toy"), tmp_path_factory.mktemp("dense32")
    for index in (0, 1):
        call_main("preprocess_volume", *preprocess_args(toy, index, tiny_model_dir, "--layout", TOY, "--features-dtype", "float32"),
                  check=True)
        call_main("preprocess_volume", *preprocess_args(dense, index, tiny_model_dir, "--features-dtype", "float32"), check=True)
    return toy, dense


def metadata(cache: Path, index: int) -> dict:
    return json.loads(VolumePaths(cache, index).metadata.read_text())


def test_the_extraction_writes_the_new_form(caches):
    toy, dense = caches
    m, d = metadata(toy, 0), metadata(dense, 0)
    channels = m["shapes"]["features"][0]
    assert m["configuration"]["layout"] == TOY and d["configuration"]["layout"] == "dense"
    assert m["configuration"]["chunks"] == m["integrity"]["chunks"]["features"] == [channels, 4, 4, 4]
    assert d["configuration"]["chunks"] == [channels, 16, 16, 16]
    assert m["dtypes"]["features"] == "float32"
    assert m["configuration"]["fingerprint"] == d["configuration"]["fingerprint"]  # the same features


def test_the_audit_verifies_summarises_and_previews_it(caches, tmp_path):
    toy, _ = caches
    assert verify_volume(toy, 0, num_threads=2).ok
    previews = tmp_path / "previews"
    audit = call_main("check_preprocessing", "--output-dir", toy, "--verify-all", "--preview", previews)
    assert audit.returncode == 0, audit.stdout + audit.stderr
    assert f"layout {TOY}" in audit.stdout
    assert sorted(p.name for p in previews.iterdir()) == ["volume_000000_preview.png", "volume_000001_preview.png"]


def test_verification_names_a_damaged_chunk_of_the_new_form(caches, tmp_path):
    toy, _ = caches
    cache = tmp_path / "cache"
    shutil.copytree(toy, cache)
    chunk = VolumePaths(cache, 1).array("features") / "0.1.2.3"
    data = bytearray(chunk.read_bytes())
    data[100] ^= 0xFF
    chunk.write_bytes(bytes(data))
    check = verify_volume(cache, 1, num_threads=2)
    assert not check.ok and any("chunk 0.1.2.3 crc32" in p for p in check.problems), check.problems
    assert verify_volume(cache, 0, num_threads=2).ok


@pytest.mark.parametrize("crop_size", [None, (5, 7, 9)])
def test_the_loader_delivers_the_features_of_the_dense_form(caches, crop_size):
    toy, dense = caches
    a = PreprocessedDINOv3Dataset(toy, crop_size=crop_size, samples_per_volume=2)
    b = PreprocessedDINOv3Dataset(dense, crop_size=crop_size, samples_per_volume=2)
    assert len(a) == len(b) == 4
    for i in range(len(a)):
        (fa, ga, ma), (fb, gb, mb) = a[i], b[i]
        assert fa.dtype == torch.float32 and fa.shape == fb.shape
        # the same definition over differently shaped blocks: float32 rounding apart
        np.testing.assert_allclose(fa.numpy(), fb.numpy(), rtol=1e-5, atol=1e-5)
        assert torch.equal(ga, gb) and torch.equal(ma, mb)


def test_an_unregistered_form_is_refused_by_the_loader_and_the_audit(caches, tmp_path):
    toy, _ = caches
    cache = tmp_path / "cache"
    shutil.copytree(toy, cache)
    unregister_storage(TOY)
    try:
        check = verify_volume(cache, 0, num_threads=2)
        assert not check.ok and f"configuration.layout '{TOY}' is no storage form this version knows" in check.problems[-1]
        with pytest.raises(CacheToolError, match="no storage form this version knows"):
            PreprocessedDINOv3Dataset(cache)[0]
    finally:
        register_storage(WholeChannelDense())
