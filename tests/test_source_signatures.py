"""Source signatures and check_preprocessing.py --check-sources on real stores: a CellMap data
root of a zarr v2 dataset (alpha) and an N5 one (gamma), edited after extraction; the same on
the S3 server the tests use; submit_preprocessing_jobs.py --stale-only; volumes without a
signature; and the bad inputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cellmap_data as data
import numpy as np
import pytest
import tensorstore as ts
from conftest import TINY_GEOMETRY_ARGS, call_main, run_script, s3_server_holding

from dinov3_cache.errors import EXIT_DAMAGED, EXIT_OK, EXIT_STALE, EXIT_UNREACHABLE, EXIT_USAGE
from dinov3_cache.paths import VolumePaths
from dinov3_cache.records import read_json, write_json_atomic
from dinov3_cache.schema import seal_metadata
from dinov3_cache.sources.base import CropGeometry, LabelFilters, SamplingOptions
from dinov3_cache.sources.cellmap import CellMapSource, Storage, prepare_catalog
from dinov3_cache.sources.cellmap.signing import chunk_grid, decode_axis, read_documents, touched_chunks
from dinov3_cache.zarr_arrays import open_array

FIXTURE_V1 = Path(__file__).parent / "fixtures" / "cache_v1"
ORGANELLE = "cell"  # in alpha's crop2 (zarr v2, 64 nm level resampled) and gamma's crop4 (N5, 128 nm)
VOLUMES = 4
DATASETS = ("jrc_alpha", "jrc_gamma")


def extraction_args(out: Path, model: Path, root: str, *extra: str) -> list[str]:
    return ["--output-dir", str(out), "--model-id", str(model), "--data-root", root, "--organelles", ORGANELLE,
            *TINY_GEOMETRY_ARGS, *extra]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, tiny_model_dir) -> tuple[Path, Path]:
    """A data root and a cache of VOLUMES volumes extracted from it; tests edit copies."""
    base = tmp_path_factory.mktemp("signatures")
    root = base / "data"
    data.build_alpha(root)
    data.build_gamma(root)
    cache = base / "cache"
    for index in range(VOLUMES):
        call_main("preprocess_volume", "--volume-index", index, *extraction_args(cache, tiny_model_dir, str(root)), check=True)
    return root, cache


@pytest.fixture
def copies(pristine, tmp_path) -> tuple[Path, Path]:
    """This test's own data root and cache (the cache's signatures name the pristine root: the
    check finds its arrays under the root given now)."""
    root, cache = tmp_path / "data", tmp_path / "cache"
    shutil.copytree(pristine[0], root)
    shutil.copytree(pristine[1], cache)
    return root, cache


def check(cache: Path, *args: str):
    return call_main("check_preprocessing", "--output-dir", cache, "--check-sources", *args)


def statuses(cache: Path, *args: str) -> tuple[int, dict[int, str], dict]:
    result = check(cache, "--json", *args)
    report = json.loads(result.stdout)
    section = report["source_check"]
    return result.returncode, {v["index"]: v["source_status"] for v in section["volumes"]}, report


def signature(cache: Path, index: int) -> dict:
    return read_json(VolumePaths(cache, index).metadata)["source_dataset"]


def moved(url: str, root: Path) -> str:
    """A recorded URL (under the pristine root) under this test's root."""
    return str(root) + url[url.index("/jrc_"):]


def selected_voxels(record: dict) -> set[tuple[int, int, int]]:
    axes = [decode_axis(a, "test") for a in record["selection"]]
    return {(int(z), int(y), int(x)) for z in axes[0] for y in axes[1] for x in axes[2]}


def open_level(url: str, driver: str) -> ts.TensorStore:
    """A source level for writing, indexed z, y, x (N5 stores x, y, z)."""
    store = ts.open({"driver": driver, "kvstore": {"driver": "file", "path": url}, "open": True}).result()
    return store.T if driver == "n5" else store


def label_record(cache: Path, index: int) -> dict:
    return signature(cache, index)["signature"]["arrays"][ORGANELLE]


def voxel_read_only_by(cache: Path, index: int) -> tuple[int, int, int]:
    """A label voxel volume `index` read that no other volume read."""
    mine = label_record(cache, index)
    others = set()
    for other in range(VOLUMES):
        record = label_record(cache, other)
        if other != index and record["url"] == mine["url"]:
            others |= selected_voxels(record)
    return sorted(selected_voxels(mine) - others)[0]


def volume_reading(cache: Path, dataset: str) -> int:
    return next(i for i in range(VOLUMES) if signature(cache, i)["dataset"] == dataset)


def test_every_volume_records_a_signature_of_what_it_read(pristine):
    root, cache = pristine
    datasets = {signature(cache, i)["dataset"] for i in range(VOLUMES)}
    assert datasets == set(DATASETS), "the fixture must read both the zarr and the N5 dataset"
    for index in range(VOLUMES):
        recorded = signature(cache, index)["signature"]
        assert recorded["source"] == "cellmap" and set(recorded["arrays"]) == {"raw", ORGANELLE}
        for record in recorded["arrays"].values():
            stored = [c for c in record["chunks"].values() if c["size"] is not None]  # absent: the fill value
            assert stored and all(len(c["sha256"]) == 32 and c["size"] > 0 and len(c["values_sha256"]) == 32 for c in stored)
            own = {"zarr": "array/.zarray", "n5": "array/attributes.json"}[record["driver"]]
            assert record["metadata"][own] and any(d for n, d in record["metadata"].items() if n.startswith("group/"))


def test_nothing_changed_every_volume_is_current(pristine):
    root, cache = pristine
    code, found, report = statuses(cache, "--data-root", root)
    assert code == EXIT_OK, report["verdict"]
    assert found == dict.fromkeys(range(VOLUMES), "current")
    assert report["source_check"]["chunks_compared"] > 0 and report["source_check"]["chunks_hashed"] == 0
    text = check(cache, "--data-root", root).stdout
    assert f"{VOLUMES} volume(s) checked: {VOLUMES} current, 0 stale" in text and "chunk(s) compared" in text


@pytest.mark.parametrize("dataset", DATASETS)
def test_a_label_voxel_changed_inside_one_crop_makes_that_volume_stale_and_stale_only_recomputes_it(copies, dataset, tiny_model_dir):
    root, cache = copies
    k = volume_reading(cache, dataset)
    record = label_record(cache, k)
    z, y, x = voxel_read_only_by(cache, k)
    level = open_level(moved(record["url"], root), record["driver"])
    level[z, y, x] = int(level[z, y, x].read().result()) + 4242
    old_gt = open_array(VolumePaths(cache, k).array("gt")).read().result()

    code, found, report = statuses(cache, "--data-root", root)
    assert code == EXIT_STALE, report["verdict"]
    assert found == {i: "stale" if i == k else "current" for i in range(VOLUMES)}
    change = next(v for v in report["source_check"]["volumes"] if v["index"] == k)["changes"][0]
    assert change["array"] == ORGANELLE and change["what"] == "chunks" and change["inside_crop"] and len(change["items"]) == 1
    text = check(cache, "--data-root", root).stdout
    assert f"volume {k}: stale: {ORGANELLE}: chunks {change['items'][0]} changed inside the crop region" in text

    submitted = run_script("submit_preprocessing_jobs.py", "--num-volumes", VOLUMES, "--stale-only", "--scheduler", "local",
                           "--no-gpu", *extraction_args(cache, tiny_model_dir, str(root)))
    assert submitted.returncode == EXIT_OK, submitted.stdout + submitted.stderr
    assert f"stale-only: 1 of {VOLUMES} volumes have a changed source: {k}" in submitted.stdout
    new_gt = open_array(VolumePaths(cache, k).array("gt")).read().result()
    options = SamplingOptions(organelles=(ORGANELLE,), filters=LabelFilters())
    expected = CellMapSource(prepare_catalog(str(root), None, None, Storage())).sample(k, CropGeometry(128.0, 32.0, 16), options)
    assert np.array_equal(new_gt, expected.gt) and not np.array_equal(new_gt, old_gt)
    code, found, _ = statuses(cache, "--data-root", root)
    assert code == EXIT_OK and set(found.values()) == {"current"}


def test_a_voxel_changed_outside_every_crop_leaves_every_volume_current(copies):
    """In a chunk some crop read from, but a voxel none read: the chunk's bytes change, no crop's values do."""
    root, cache = copies
    k = volume_reading(cache, "jrc_alpha")
    record = label_record(cache, k)
    read = set().union(*(selected_voxels(label_record(cache, i)) for i in range(VOLUMES) if label_record(cache, i)["url"] == record["url"]))
    documents = read_documents(moved(record["url"], root), moved(record["group"], root), record["driver"], Storage())
    grid = chunk_grid(record["driver"], documents["array/.zarray"], "test")
    level = open_level(moved(record["url"], root), record["driver"])
    lo = [min(v[a] for v in selected_voxels(record)) // grid.shape[a] * grid.shape[a] for a in range(3)]
    voxel = next(
        (z, y, x) for z in range(lo[0], min(lo[0] + grid.shape[0], level.shape[0])) for y in range(lo[1], lo[1] + grid.shape[1])
        for x in range(lo[2], lo[2] + grid.shape[2]) if (z, y, x) not in read and y < level.shape[1] and x < level.shape[2]
    )
    level[voxel] = int(level[voxel].read().result()) + 4242

    code, found, report = statuses(cache, "--data-root", root)
    assert code == EXIT_OK, report["verdict"]
    assert set(found.values()) == {"current"}
    assert report["source_check"]["chunks_changed_outside_crop"] >= 1
    assert report["source_check"]["chunks_compared"] >= sum(len(label_record(cache, i)["chunks"]) for i in range(VOLUMES))


def change_translation(group: Path, fmt: str) -> None:
    """Shift every level of a multiscale group by 8 nm along x in its metadata."""
    attributes_file = group / (".zattrs" if fmt == "zarr" else "attributes.json")
    attributes = json.loads(attributes_file.read_text())
    for dataset in attributes["multiscales"][0]["datasets"]:
        if "transform" in dataset:
            dataset["transform"]["translate"][0] += 8  # N5 lists x first
        else:
            dataset["coordinateTransformations"][1]["translation"][2] += 8
    attributes_file.write_text(json.dumps(attributes))


@pytest.mark.parametrize("dataset,fmt", [("jrc_alpha", "zarr"), ("jrc_gamma", "n5")])
def test_a_changed_translation_makes_the_volumes_reading_the_array_stale(copies, dataset, fmt):
    root, cache = copies
    change_translation(data.raw_group(root, dataset, fmt), fmt)
    code, found, report = statuses(cache, "--data-root", root)
    assert code == EXIT_STALE
    assert found == {i: "stale" if signature(cache, i)["dataset"] == dataset else "current" for i in range(VOLUMES)}
    changes = [v["changes"] for v in report["source_check"]["volumes"] if v["source_status"] == "stale"]
    assert all(c[0]["array"] == "raw" and c[0]["what"] == "metadata" for c in changes)


def test_a_changed_voxel_size_in_the_array_metadata_is_stale(copies):
    root, cache = copies
    record = label_record(cache, volume_reading(cache, "jrc_alpha"))
    zarray = Path(moved(record["url"], root)) / ".zarray"
    document = json.loads(zarray.read_text())
    document["fill_value"] = 7  # any edit of the array's own metadata
    zarray.write_text(json.dumps(document))
    code, found, _ = statuses(cache, "--data-root", root)
    assert code == EXIT_STALE
    assert found == {i: "stale" if signature(cache, i)["dataset"] == "jrc_alpha" else "current" for i in range(VOLUMES)}


def test_a_deleted_source_array_is_unreachable(copies):
    root, cache = copies
    k = volume_reading(cache, "jrc_gamma")
    shutil.rmtree(moved(label_record(cache, k)["url"], root))
    result = check(cache, "--data-root", root)
    assert result.returncode == EXIT_UNREACHABLE, result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines() if f"volume {k}: unreachable" in line]
    assert len(lines) == 1 and "is gone" in lines[0] and "Traceback" not in result.stdout + result.stderr
    _, found, _ = statuses(cache, "--data-root", root)
    assert found == {i: "unreachable" if signature(cache, i)["dataset"] == "jrc_gamma" else "current" for i in range(VOLUMES)}


def strip_signature(cache: Path, index: int) -> None:
    """The volume as written before signatures: schema version 2, no signature, resealed."""
    path = VolumePaths(cache, index).metadata
    document = read_json(path)
    del document["source_dataset"]["signature"]
    document["schema_version"] = 2
    write_json_atomic(path, seal_metadata({k: v for k, v in document.items() if k != "metadata_digest"}))


def test_a_volume_without_signature_reports_no_signature(copies):
    root, cache = copies
    strip_signature(cache, 1)
    code, found, report = statuses(cache, "--data-root", root)
    assert code == EXIT_OK, report["verdict"]
    assert found[1] == "no_signature" and all(s == "current" for i, s in found.items() if i != 1)
    assert not report["metadata_problems"]


def test_a_version_1_cache_reports_no_signature_without_any_source_option(tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(FIXTURE_V1, cache)
    code, found, report = statuses(cache)
    assert code == EXIT_OK, report["verdict"]
    assert found == {0: "no_signature"}


def test_a_synthetic_cache_is_current_without_any_source_option(built_cache):
    code, found, _ = statuses(built_cache)
    assert code == EXIT_OK and found == {0: "current", 1: "current", 2: "current"}


def test_a_changed_synthetic_generator_makes_the_volume_stale(built_cache, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(built_cache, cache)
    path = VolumePaths(cache, 1).metadata
    document = read_json(path)
    document["source_dataset"]["signature"]["generator"]["version"] = 0  # made by an older generator
    write_json_atomic(path, seal_metadata({k: v for k, v in document.items() if k != "metadata_digest"}))
    code, found, _ = statuses(cache)
    assert code == EXIT_STALE and found == {0: "current", 1: "stale", 2: "current"}


@pytest.mark.parametrize("spec", [
    {"driver": "zarr", "metadata": {"dimension_separator": "/"}},
    {"driver": "zarr", "metadata": {}},
    {"driver": "zarr3", "metadata": {}},
    {"driver": "zarr3", "metadata": {"chunk_key_encoding": {"name": "v2", "configuration": {"separator": "."}}}},
    {"driver": "zarr3", "metadata": {"codecs": [{"name": "sharding_indexed", "configuration": {"chunk_shape": [2, 2, 2]}}]}},
    {"driver": "n5", "metadata": {"compression": {"type": "raw"}}},
], ids=["zarr2-slash", "zarr2-dot", "zarr3", "zarr3-v2-keys", "zarr3-shards", "n5"])
def test_chunk_keys_name_the_files_each_store_writes(tmp_path, spec):
    """Every chunk (zarr v3 sharded: every shard) written by TensorStore is where chunk_grid's key says."""
    path = tmp_path / "array"
    chunks = [4, 4, 8]
    metadata = {**spec["metadata"], "dtype": "|u1", "shape": [8, 12, 16]}
    if spec["driver"] == "n5":
        metadata = {**spec["metadata"], "dataType": "uint8", "dimensions": [16, 12, 8], "blockSize": chunks[::-1]}
    elif spec["driver"] == "zarr3":
        metadata = {**metadata, "data_type": "uint8", "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": chunks}}}
        del metadata["dtype"]
    else:
        metadata["chunks"] = chunks
    store = ts.open({"driver": spec["driver"], "kvstore": {"driver": "file", "path": str(path)}, "metadata": metadata, "create": True}).result()
    store[...] = np.ones(store.shape, np.uint8)  # N5: written x, y, z
    name = {"zarr": ".zarray", "zarr3": "zarr.json", "n5": "attributes.json"}[spec["driver"]]
    grid = chunk_grid(spec["driver"], json.loads((path / name).read_text()), str(path))
    axes = [np.arange(n) for n in (8, 12, 16)]  # z, y, x
    keys = {key for key, _ in touched_chunks(axes, (0, 1, 2), grid)}
    written = {str(f.relative_to(path)) for f in path.rglob("*") if f.is_file() and f.name != name}
    assert keys == written and len(keys) == 2 * 3 * 2


# ----------------------------------------------------------------------------- bad input


def one_error_line(result, status: int, *words: str) -> None:
    assert result.returncode == status, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0]


def test_a_cellmap_cache_without_a_data_root_is_one_line(pristine, monkeypatch):
    monkeypatch.delenv("DINOV3_DATA_ROOT", raising=False)
    one_error_line(check(pristine[1]), EXIT_USAGE, "--check-sources", "--data-root")


def test_stale_only_without_a_data_root_is_one_line_and_submits_nothing(pristine, tiny_model_dir, monkeypatch):
    monkeypatch.delenv("DINOV3_DATA_ROOT", raising=False)
    result = call_main("submit_preprocessing_jobs", "--num-volumes", VOLUMES, "--stale-only", "--scheduler", "local",
                       "--output-dir", pristine[1], "--model-id", tiny_model_dir, "--source", "synthetic", *TINY_GEOMETRY_ARGS)
    one_error_line(result, EXIT_USAGE, "--stale-only", "--data-root")
    assert not (pristine[1] / "logs" / "submissions").exists()


def test_a_missing_or_wrong_catalog_is_one_line(pristine, tmp_path):
    one_error_line(check(pristine[1], "--catalog", tmp_path / "absent.json"), EXIT_USAGE, "--catalog")
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"datasets": [{"name": "x", "raw": str(tmp_path / "x.zarr/raw"), "labels": []}]}))
    one_error_line(check(pristine[1], "--catalog", other), EXIT_USAGE, "holds none of the arrays")


def corrupt_chunks(record: dict) -> None:
    record["chunks"] = "corrupt"


def corrupt_chunk_entry(record: dict) -> None:
    record["chunks"][sorted(record["chunks"])[0]] = 5


@pytest.mark.parametrize("corrupt,named", [(corrupt_chunks, "source signature key 'chunks'"),
                                           (corrupt_chunk_entry, "chunk entry is not an object"),
                                           ("arrays", "'source_dataset.signature.arrays' must be")])
def test_a_corrupt_signature_is_reported_as_damage(copies, corrupt, named):
    root, cache = copies
    path = VolumePaths(cache, 2).metadata
    document = read_json(path)
    if corrupt == "arrays":  # the schema's own check
        document["source_dataset"]["signature"]["arrays"] = "corrupt"
    else:
        corrupt(document["source_dataset"]["signature"]["arrays"]["raw"])
    write_json_atomic(path, seal_metadata({k: v for k, v in document.items() if k != "metadata_digest"}))
    result = check(cache, "--data-root", root)
    assert result.returncode == EXIT_DAMAGED, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    problems = [line for line in result.stdout.splitlines() if named in line]
    assert len(problems) == 1, result.stdout


# ----------------------------------------------------------------------------- S3


@pytest.fixture
def s3_copy(copies):
    """This test's data root on the S3 server (the alpha dataset)."""
    root, _ = copies
    with s3_server_holding(root, "jrc_alpha") as endpoint:
        yield endpoint


def test_on_s3_etags_decide_and_a_changed_chunk_object_makes_its_volume_stale(copies, s3_copy, tiny_model_dir, tmp_path, monkeypatch):
    import boto3

    root, _ = copies
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "DINOV3_DATA_ROOT"):
        monkeypatch.delenv(name, raising=False)
    bucket_root = "s3://cellmap-test/data"
    cache = tmp_path / "s3cache"
    s3_args = ("--data-root", bucket_root, "--s3-endpoint", s3_copy)
    for index in range(2):
        call_main("preprocess_volume", "--volume-index", index, *extraction_args(cache, tiny_model_dir, bucket_root),
                  "--s3-endpoint", s3_copy, check=True)
    record = label_record(cache, 0)
    assert all(c["etag"] and c["size"] > 0 for c in record["chunks"].values() if c["size"] is not None)
    code, found, report = statuses(cache, *s3_args)
    assert code == EXIT_OK and found == {0: "current", 1: "current"}, report["verdict"]
    assert report["source_check"]["chunks_hashed"] == 0

    voxel = sorted(selected_voxels(record) - (selected_voxels(label_record(cache, 1)) if label_record(cache, 1)["url"] == record["url"] else set()))[0]
    local = moved(record["url"].replace(bucket_root, "/x"), root)
    level = open_level(local, record["driver"])
    level[voxel] = int(level[voxel].read().result()) + 4242
    documents = read_documents(local, moved(record["group"].replace(bucket_root, "/x"), root), record["driver"], Storage())
    grid = chunk_grid(record["driver"], documents["array/.zarray"], "test")
    key = next(k for k, positions in touched_chunks([np.array([v]) for v in voxel], (0, 1, 2), grid))
    client = boto3.client("s3", endpoint_url=s3_copy, region_name="us-east-1", aws_access_key_id="testing", aws_secret_access_key="testing")
    object_key = record["url"][len("s3://cellmap-test/"):] + "/" + key
    client.upload_file(str(Path(local, *key.split("/"))), "cellmap-test", object_key, ExtraArgs={"ACL": "public-read"})

    code, found, report = statuses(cache, *s3_args)
    assert code == EXIT_STALE, report["verdict"]
    assert found[0] == "stale"


def test_a_store_that_cannot_be_reached_makes_its_volumes_unreachable(copies, tiny_model_dir, tmp_path, monkeypatch):
    """Extracted from the S3 server, checked once it is gone (the saved catalog, so no scan is needed)."""
    root, _ = copies
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "DINOV3_DATA_ROOT"):
        monkeypatch.delenv(name, raising=False)
    cache = tmp_path / "s3cache"
    with s3_server_holding(root, "jrc_alpha") as endpoint:
        call_main("preprocess_volume", "--volume-index", 0, *extraction_args(cache, tiny_model_dir, "s3://cellmap-test/data"),
                  "--s3-endpoint", endpoint, check=True)
    result = check(cache, "--catalog", cache / "cellmap_catalog.json", "--s3-endpoint", endpoint)
    assert result.returncode == EXIT_UNREACHABLE, result.stdout + result.stderr
    [line] = [line for line in result.stdout.splitlines() if line.startswith("  volume 0: unreachable: ")]
    assert endpoint in line and "Traceback" not in result.stdout + result.stderr
