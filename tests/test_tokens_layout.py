"""The tokens layout: the same features as the dense layout of the same index, through the
unchanged loader API; crops read only the tokens under them; audit, verify and overwrite."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from dinov3_cache.extraction.settings import ExtractionSettings
from dinov3_cache.loader.dataloader import create_preprocessed_dataloader
from dinov3_cache.loader.dataset import PreprocessedDINOv3Dataset
from dinov3_cache.loader.reader import ReadResources
from dinov3_cache.loader.volumes import find_volumes
from dinov3_cache.paths import VolumePaths
from dinov3_cache.storage import storage_for
from dinov3_cache.storage.planes import PLANE_AXES
from dinov3_cache.storage.upsampling import rounding_bound
from dinov3_cache.zarr_arrays import open_array, ts_context
from tests.conftest import call_main, preprocess_args


@pytest.fixture(scope="module")
def both_layouts(tmp_path_factory, tiny_model_dir) -> tuple[Path, Path]:
    """Volumes 0 and 1 extracted twice: dense in one cache, tokens in the other."""
    dense, tokens = tmp_path_factory.mktemp("dense"), tmp_path_factory.mktemp("tokens")
    for index in (0, 1):
        call_main("preprocess_volume", *preprocess_args(dense, index, tiny_model_dir), check=True)
        call_main("preprocess_volume", *preprocess_args(tokens, index, tiny_model_dir, "--layout", "tokens"), check=True)
    return dense, tokens


def metadata(cache: Path, index: int) -> dict:
    return json.loads(VolumePaths(cache, index).metadata.read_text())


def bound(cache: Path, index: int) -> float:
    tokens = open_array(VolumePaths(cache, index).array("tokens"), ts_context(2)).read().result()
    return rounding_bound(torch.float16, float(abs(tokens.astype("float32")).max()))


def test_tokens_volume_records_its_layout_and_shares_the_fingerprint(both_layouts):
    dense, tokens = both_layouts
    d, t = metadata(dense, 0), metadata(tokens, 0)
    assert d["configuration"]["layout"] == "dense" and t["configuration"]["layout"] == "tokens"
    assert d["configuration"]["fingerprint"] == t["configuration"]["fingerprint"]
    assert not VolumePaths(tokens, 0).array("features").exists()
    c, depth = d["shapes"]["features"][0], d["shapes"]["features"][1]
    assert t["shapes"]["features"] == d["shapes"]["features"]
    assert t["shapes"]["tokens"] == [3, c, depth, 4, 4]  # 64-pixel slices, patch 16
    assert t["dtypes"]["tokens"] == "float16" and "features" not in t["dtypes"]
    assert t["storage"]["bytes"]["tokens"] * 3 < d["storage"]["bytes"]["features"]
    assert ExtractionSettings(output_dir="x", layout="tokens").values()["layout"] == "tokens"  # the settings file
    assert ExtractionSettings(output_dir="x").config(0).storage_form.name == "dense"


@pytest.mark.parametrize("crop_size", [None, (5, 7, 9), (1, 16, 3)])
def test_both_layouts_deliver_the_same_features_and_identical_labels(both_layouts, crop_size):
    dense, tokens = both_layouts
    a = PreprocessedDINOv3Dataset(dense, crop_size=crop_size, samples_per_volume=3)
    b = PreprocessedDINOv3Dataset(tokens, crop_size=crop_size, samples_per_volume=3)
    for i in range(len(a)):
        (fa, ga, ma), (fb, gb, mb) = a[i], b[i]
        assert fa.shape == fb.shape and fa.dtype == fb.dtype == torch.float32
        difference = float((fa - fb).abs().max())
        assert difference <= bound(tokens, i // 3), (i, difference)
        assert torch.equal(ga, gb) and torch.equal(ma, mb)


@pytest.mark.parametrize("features_dtype", [torch.float32, None])
def test_dataloader_batches_match_across_layouts(both_layouts, features_dtype):
    dense, tokens = both_layouts
    options = {"batch_size": 2, "crop_size": (6, 6, 6), "samples_per_volume": 2, "features_dtype": features_dtype}
    batches = zip(create_preprocessed_dataloader(dense, **options), create_preprocessed_dataloader(tokens, **options))
    count = 0
    for (fa, ga, ma), (fb, gb, mb) in batches:
        assert fa.dtype == fb.dtype == (features_dtype or torch.float16)
        # float16 delivery rounds the built features once more: one unit roundoff of the largest
        slack = 0 if features_dtype else 2**-11 * float(fa.float().abs().max())
        assert float((fa.float() - fb.float()).abs().max()) <= max(bound(tokens, 0), bound(tokens, 1)) + slack
        assert torch.equal(ga, gb) and torch.equal(ma, mb)
        count += 1
    assert count == 2


def test_a_cache_may_mix_the_layouts(both_layouts, tmp_path):
    dense, tokens = both_layouts
    mixed = tmp_path / "mixed"
    shutil.copytree(dense, mixed)
    for path in VolumePaths(mixed, 1).existing_arrays() + [VolumePaths(mixed, 1).metadata]:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    for path in VolumePaths(tokens, 1).existing_arrays() + [VolumePaths(tokens, 1).metadata]:
        (shutil.copytree if path.is_dir() else shutil.copy)(path, mixed / path.name)
    loader = create_preprocessed_dataloader(mixed, batch_size=2, crop_size=(4, 4, 4))
    reference = create_preprocessed_dataloader(dense, batch_size=2, crop_size=(4, 4, 4))
    for (fa, ga, _), (fb, gb, _) in zip(loader, reference):
        assert float((fa - fb).abs().max()) <= bound(tokens, 1) and torch.equal(ga, gb)


def test_a_crop_reads_only_the_tokens_under_it(both_layouts):
    _, tokens = both_layouts
    (volume,) = find_volumes(tokens, [0])
    reader = ReadResources(2, "auto").reader(volume)
    crop, pending = storage_for("tokens").start_read(reader, (slice(0, 4), slice(0, 4), slice(12, 16)), None)
    reader.finish(pending)
    # 16 outputs from 4 tokens: outputs 0-3 read tokens 0-1, outputs 12-15 tokens 2-3
    assert {p: tuple(g.shape[1:]) for p, g in crop.grids.items()} == {"xy": (4, 2, 2), "xz": (4, 2, 2), "yz": (4, 2, 2)}
    assert crop.origins == {"xy": (0, 2), "xz": (0, 2), "yz": (0, 0)}


def test_token_windows_are_read_in_whole_chunks_and_arrive_exact(tmp_path, tiny_model_dir, monkeypatch):
    """128-pixel slices: 8^2 token grids in one (.., 8, 8) chunk per plane and slab. A crop's
    windows are read in whole chunks along b (16 bytes per chunk row: copied 16 bytes at a time
    once the files are checked), and the grids cut from them are exactly the stored tokens."""
    from dinov3_cache.loader import chunk_copy

    cache = tmp_path / "grids8"
    call_main("preprocess_volume", *preprocess_args(cache, 0, tiny_model_dir, "--layout", "tokens", "--min-resolution-for-raw", "16"),
              check=True)
    stored = torch.from_numpy(open_array(VolumePaths(cache, 0).array("tokens"), ts_context(2)).read().result())
    assert stored.shape[-2:] == (8, 8) and metadata(cache, 0)["configuration"]["chunks"][-2:] == [8, 8]
    wide = []
    real = chunk_copy.widened
    monkeypatch.setattr(chunk_copy, "widened", lambda s, t: wide.append(real(s, t)[0].dtype == torch.complex128) or real(s, t))
    (volume,) = find_volumes(cache, [0])
    reader = ReadResources(2, "auto").reader(volume)
    for spatial in [(slice(0, 16),) * 3, (slice(3, 11), slice(5, 9), slice(9, 16)), (slice(15, 16), slice(0, 2), slice(7, 8))]:
        for _ in range(2):  # checked on the first read, copied from the kept mappings on the second
            crop, pending = storage_for("tokens").start_read(reader, spatial, None)
            reader.finish(pending)
            for position, (plane, grids) in enumerate(crop.grids.items()):
                normal, _ = PLANE_AXES[plane]
                (a0, b0), (_, _, wa, wb) = crop.origins[plane], grids.shape
                assert crop.windows[plane].shape[-1] == 8  # whole chunks along b
                assert torch.equal(grids, stored[position, :, spatial[normal], a0 : a0 + wa, b0 : b0 + wb]), (plane, spatial)
    assert wide and all(wide)


def test_token_windows_reuse_batch_memory_only_once_it_is_free(both_layouts):
    """Token windows are carved from the loader's reused batch buffers: a batch still held keeps
    its windows (a later read never writes into them); once dropped, its buffer is reused."""
    _, tokens = both_layouts
    dataset = PreprocessedDINOv3Dataset(tokens, crop_size=(5, 7, 9), samples_per_volume=4, volume_indices=[0])

    def buffers(raw) -> set[int]:
        return {window.untyped_storage().data_ptr() for window in raw.tokens[0].windows.values()}

    first = dataset.read_batch([0], convert_on_host=False)  # built later, where the batch goes
    kept = {plane: window.clone() for plane, window in first.tokens[0].windows.items()}
    second = dataset.read_batch([1], convert_on_host=False)
    assert len(buffers(first)) == 1 and buffers(first).isdisjoint(buffers(second))
    assert all(torch.equal(first.tokens[0].windows[plane], window) for plane, window in kept.items())
    freed = buffers(first)
    del first
    assert buffers(dataset.read_batch([2], convert_on_host=False)) == freed


def test_chunks_option_shapes_the_tokens_array(both_layouts, tmp_path, tiny_model_dir):
    """--chunks C,SLICE,A,B in the tokens layout: the tokens array is chunked so (one plane per
    chunk), verifies, and delivers exactly what the default chunks deliver."""
    _, tokens = both_layouts
    out = tmp_path / "small_chunks"
    call_main("preprocess_volume", *preprocess_args(out, 0, tiny_model_dir, "--layout", "tokens", "--chunks", "16,4,2,2"),
              check=True)
    assert metadata(out, 0)["configuration"]["chunks"] == [1, 16, 4, 2, 2]
    assert list(open_array(VolumePaths(out, 0).array("tokens"), ts_context(2)).chunk_layout.read_chunk.shape) == [1, 16, 4, 2, 2]
    assert metadata(tokens, 0)["configuration"]["chunks"] == [1, 32, 16, 4, 4]  # auto: (128, 16, 8, 8) clamped
    audit = call_main("check_preprocessing", "--output-dir", out, "--verify-all")
    assert audit.returncode == 0, audit.stdout + audit.stderr
    a = PreprocessedDINOv3Dataset(out, crop_size=(5, 7, 9), samples_per_volume=2)
    b = PreprocessedDINOv3Dataset(tokens, crop_size=(5, 7, 9), samples_per_volume=2, volume_indices=[0])
    for i in range(len(a)):
        assert torch.equal(a[i][0], b[i][0])


def test_verify_checks_the_tokens_and_names_a_damaged_chunk(both_layouts, tmp_path):
    _, tokens = both_layouts
    cache = tmp_path / "cache"
    shutil.copytree(tokens, cache)
    result = call_main("check_preprocessing", "--output-dir", cache, "--verify-all")
    assert result.returncode == 0, result.stdout
    assert "layout tokens" in result.stdout
    chunk = VolumePaths(cache, 0).array("tokens") / "0.0.0.0.0"
    data = bytearray(chunk.read_bytes())
    data[10] ^= 0xFF
    chunk.write_bytes(bytes(data))
    result = call_main("check_preprocessing", "--output-dir", cache, "--verify-all")
    assert result.returncode != 0 and "tokens" in result.stdout and "0.0.0.0.0" in result.stdout


def test_overwrite_replaces_a_dense_volume_by_a_tokens_volume(both_layouts, tmp_path, tiny_model_dir):
    dense, _ = both_layouts
    cache = tmp_path / "cache"
    shutil.copytree(dense, cache)
    before = PreprocessedDINOv3Dataset(cache, [0])[0][0]
    call_main("preprocess_volume", *preprocess_args(cache, 0, tiny_model_dir, "--layout", "tokens", "--overwrite"), check=True)
    paths = VolumePaths(cache, 0)
    assert paths.array("tokens").is_dir() and not paths.array("features").exists()
    after = PreprocessedDINOv3Dataset(cache, [0])[0][0]
    assert float((before - after).abs().max()) <= bound(cache, 0)


def test_an_unknown_layout_is_a_usage_error(tmp_path, tiny_model_dir):
    with pytest.raises(SystemExit) as exit_info:  # argparse: one error line, exit status 2
        call_main("preprocess_volume", *preprocess_args(tmp_path, 0, tiny_model_dir, "--layout", "sparse"))
    assert exit_info.value.code == 2
    assert not VolumePaths(tmp_path, 0).metadata.exists()
