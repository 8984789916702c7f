"""The loader's default reads refuse damaged chunks, array metadata that disagrees with the
volume's, and volumes under another index's names; each chunk file is checked once per
process and file identity; verify_checksums=False reads unchecked. Real caches from the CLI."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import call_main, make_chunk_fill_valued, preprocess_args, run_script

from dinov3_cache.errors import EXIT_DAMAGED
from dinov3_cache.loader import array_readers
from dinov3_cache.paths import VolumePaths
from dinov3_cache.zarr_arrays import open_array
from preprocessed_dataloader import CacheError, PreprocessedDINOv3Dataset, VolumeReadError

READERS = ["auto", "tensorstore"]
V2 = ["--chunks", "16,8,8,8"]
FORMATS = {0: V2, 1: V2, 2: ["--zarr-format", "3", "--chunks", "16,4,4,4"], 3: ["--compression", "lz4", *V2]}


@pytest.fixture(scope="module")
def source(tmp_path_factory, tiny_model_dir) -> Path:
    """Volumes 0 and 1 zarr v2 uncompressed (16 feature chunks each), 2 zarr v3 sharded, 3 v2 lz4."""
    out = tmp_path_factory.mktemp("verified")
    for index, extra in FORMATS.items():
        call_main("preprocess_volume", *preprocess_args(out, index, tiny_model_dir, *extra), check=True)
    return out


@pytest.fixture
def cache(source, tmp_path) -> Path:
    out = tmp_path / "cache"
    shutil.copytree(source, out)
    return out


def features(cache: Path, index: int = 0) -> Path:
    return VolumePaths(cache, index).array("features")


def load(cache: Path, index: int = 0, **options) -> torch.Tensor:
    return PreprocessedDINOv3Dataset(cache, volume_indices=[index], features_dtype=None, **options)[0][0]


def on_disk(cache: Path, index: int = 0) -> np.ndarray:
    """The features as TensorStore decodes the files now (damage included)."""
    return open_array(features(cache, index)).read().result()


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x5A
    path.write_bytes(bytes(data))


def swap(a: Path, b: Path) -> None:
    a.rename(a.with_name("swapping"))
    b.rename(a)
    a.with_name("swapping").rename(b)


def zero(path: Path) -> None:
    path.write_bytes(bytes(path.stat().st_size))


def copy_from_volume_1(cache: Path) -> None:
    shutil.copy(features(cache, 1) / "1.0.1.0", features(cache, 0) / "1.0.1.0")


DAMAGES = {  # volume, damage
    "byte flip": (0, lambda c: flip_byte(features(c) / "1.0.1.0")),
    "zeroed chunk": (0, lambda c: zero(features(c) / "1.0.1.0")),
    "chunks swapped": (0, lambda c: swap(features(c) / "0.0.0.0", features(c) / "1.1.1.1")),
    "chunk from another volume": (0, copy_from_volume_1),
    "v3 shards swapped": (2, lambda c: swap(features(c, 2) / "c/0/0/0/0", features(c, 2) / "c/1/0/0/0")),
    "lz4 chunks swapped": (3, lambda c: swap(features(c, 3) / "0.0.0.0", features(c, 3) / "1.0.0.0")),
}


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("damage", DAMAGES)
def test_the_default_loader_refuses_damaged_chunks_and_the_opt_out_reads_them(cache, damage, reader):
    index, make = DAMAGES[damage]
    intact = on_disk(cache, index)
    make(cache)
    assert not np.array_equal(on_disk(cache, index), intact)  # the damage changes the values delivered
    with pytest.raises(VolumeReadError, match=rf"volume {index} array 'features'.*chunk [0-9.]+ fails its checksum"):
        load(cache, index, reader=reader)
    unchecked = load(cache, index, reader=reader, verify_checksums=False)  # the explicit opt-out: no check
    assert np.array_equal(unchecked.numpy(), on_disk(cache, index))


@pytest.mark.parametrize("verify", [True, False])
@pytest.mark.parametrize("field, value", [("order", "F"), ("fill_value", 3), ("filters", [{"id": "delta", "dtype": "<f2"}])])
def test_array_metadata_edited_away_from_the_volumes_is_refused(cache, field, value, verify):
    zarray = features(cache) / ".zarray"
    document = json.loads(zarray.read_text())
    document[field] = value
    zarray.write_text(json.dumps(document))
    with pytest.raises(VolumeReadError, match=rf"volume 0 array 'features'.*'{field}' is .* on disk, the volume's metadata implies"):
        load(cache, verify_checksums=verify)


def test_an_array_replaced_under_a_forged_commit_id_is_refused(cache):
    commit_id = json.loads(VolumePaths(cache, 0).metadata.read_text())["integrity"]["commit_id"]
    shutil.rmtree(features(cache))
    shutil.copytree(features(cache, 1), features(cache))
    zattrs = features(cache) / ".zattrs"
    attributes = json.loads(zattrs.read_text())
    attributes["dinov3_cache"].update(commit_id=commit_id, volume_index=0)  # forged: says it is volume 0's
    zattrs.write_text(json.dumps(attributes))
    with pytest.raises(VolumeReadError, match=r"volume 0 array 'features'.*fails its checksum"):
        load(cache)


def copy_volume_over(cache: Path, source: int, target: int) -> None:
    """Volume `source`'s files copied over volume `target`'s names (arrays and metadata)."""
    src, dst = VolumePaths(cache, source), VolumePaths(cache, target)
    for array in ("features", "gt", "mask"):
        shutil.rmtree(dst.array(array))
        shutil.copytree(src.array(array), dst.array(array))
    shutil.copy(src.metadata, dst.metadata)


@pytest.mark.parametrize("verify", [True, False])
def test_a_volume_copied_over_another_index_is_refused_by_the_loader(cache, verify):
    copy_volume_over(cache, 1, 0)
    with pytest.raises(CacheError, match=r"volume 0: .*metadata.json: its metadata says volume_index 1: the files were copied or renamed"):
        load(cache, verify_checksums=verify)


def test_a_volume_copied_over_another_index_is_damaged_in_the_audit(cache):
    copy_volume_over(cache, 1, 0)
    result = run_script("check_preprocessing.py", "--output-dir", str(cache), "--json", "--verify-indices", "0")
    check = json.loads(result.stdout)["verification"]["volumes"][0]
    assert result.returncode == EXIT_DAMAGED and not check["ok"]
    problems = "\n".join(check["problems"])
    assert "volume_000000: damaged: its metadata says volume_index 1" in problems
    assert "volume_000000 features: the array was written for volume 1" in problems


# ----------------------------------------------------------------------------- once per file identity


def count_checks(monkeypatch) -> list[str]:
    checked: list[str] = []
    real = array_readers.check_chunk_crc

    def counting(key, recorded, data):
        checked.append(key)
        return real(key, recorded, data)

    monkeypatch.setattr(array_readers, "check_chunk_crc", counting)
    return checked


@pytest.mark.parametrize("reader", READERS)
def test_each_chunk_file_is_checked_once_and_a_replaced_one_again(cache, monkeypatch, reader):
    checked = count_checks(monkeypatch)
    first = load(cache, reader=reader)
    assert len([k for k in checked if k.count(".") == 3]) == 16  # every feature chunk, once
    checked.clear()
    assert torch.equal(load(cache, reader=reader), first) and checked == []  # a new dataset, same files: no check
    chunk = features(cache) / "1.0.1.0"
    replacement = chunk.with_name("replacement")
    replacement.write_bytes(chunk.read_bytes())
    flip_byte(replacement)
    os.replace(replacement, chunk)  # another file (inode) under the same name
    with pytest.raises(VolumeReadError, match=r"chunk 1\.0\.1\.0 fails its checksum"):
        load(cache, reader=reader)
    assert checked == ["1.0.1.0"]


def test_a_chunk_the_writer_skipped_needs_no_check_once_the_rest_is_checked(cache, monkeypatch):
    make_chunk_fill_valued(cache, 0, "features", (1, 0, 1, 0))
    checked = count_checks(monkeypatch)
    first = load(cache, reader="tensorstore")
    assert not first[16:32, 0:8, 8:16, 0:8].any() and "1.0.1.0" in checked  # read once, as the fill value
    checked.clear()
    assert torch.equal(load(cache, reader="tensorstore"), first) and checked == []


def test_a_file_rewritten_in_place_with_its_old_times_is_checked_again(cache):
    load(cache)  # every file checked and remembered
    chunk = features(cache) / "1.0.1.0"
    before = chunk.stat()
    flip_byte(chunk)
    os.utime(chunk, ns=(before.st_atime_ns, before.st_mtime_ns))  # same inode, size and modification time
    with pytest.raises(VolumeReadError, match=r"chunk 1\.0\.1\.0 fails its checksum"):
        load(cache)


def test_verification_is_the_default(cache):
    assert PreprocessedDINOv3Dataset(cache, volume_indices=[0]).verify_checksums is True


# ----------------------------------------------------------------------------- unreadable directory

UNREADABLE_PROBE = """
import os, sys
from preprocessed_dataloader import CacheError, PreprocessedDINOv3Dataset
if os.geteuid() == 0:  # imported first: nobody may not read the installation
    os.setgid(65534)
    os.setuid(65534)  # nobody: permissions apply (they do not to root)
try:
    PreprocessedDINOv3Dataset(sys.argv[1])
except CacheError as e:
    print(f"error: {e}")
"""


@pytest.mark.parametrize("where", ["directory", "parent"])
def test_an_unreadable_output_directory_is_one_clear_error(source, where):
    import subprocess
    import sys
    import tempfile

    outer = Path(tempfile.mkdtemp(dir="/tmp"))
    try:
        out = outer / "cache"
        shutil.copytree(source, out)
        outer.chmod(0o755)
        if where == "directory":
            out.chmod(0o300)  # no read: cannot be listed
        else:
            outer.chmod(0o000)  # no search: nothing below can be reached
        result = subprocess.run(
            [sys.executable, "-c", UNREADABLE_PROBE, str(out)], capture_output=True, text=True, timeout=120,
            cwd=Path(__file__).resolve().parents[1], env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
        )
    finally:
        outer.chmod(0o755)
        (outer / "cache").chmod(0o755)
        shutil.rmtree(outer)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stdout.startswith(f"error: preprocessed directory {out} cannot be read (Permission denied"), result.stdout
