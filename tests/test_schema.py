"""The metadata schema: version 1 files (tests/fixtures/cache_v1, today's format) read and
write back unchanged, version 2 documents round-trip, malformed documents fail with one
MetadataError naming the key, and the version 1 fixture still loads and verifies.

The fixture was made with:
    python3 preprocess_volume.py --volume-index 0 --output-dir /tmp/cache_v1 --source synthetic \
        --model-id random:tiny --output-image-dim 8 --base-resolution 128 --min-resolution-for-raw 32 \
        --device cpu --chunks 96,8,8,8 --save-raw
and logs/ removed. Never regenerate it: it stands for caches that already exist.
"""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import call_main, preprocess_args

from dinov3_cache.errors import EXIT_DAMAGED
from dinov3_cache.geometry import AxisTransform, VoxelGrid
from dinov3_cache.paths import VolumePaths
from dinov3_cache.records import read_json
from dinov3_cache.schema import (
    SCHEMA_VERSION,
    MetadataError,
    SourceDataset,
    Storage,
    VolumeMetadata,
    WorldTransform,
    canonical_json,
    load_volume_metadata,
    metadata_digest,
    schema_reference,
)

FIXTURE = Path(__file__).parent / "fixtures" / "cache_v1"
SEED_ORDER = ["volume_index", "volume_name", "timestamp", "paths", "source_dataset", "shapes",
              "configuration", "timing", "storage", "statistics"]


@pytest.fixture
def v1() -> dict:
    return read_json(VolumePaths(FIXTURE, 0).metadata)


@pytest.fixture
def v2(v1) -> dict:
    body = {k: v for k, v in v1.items() if k != "metadata_digest"}
    return VolumeMetadata.build(VolumeMetadata.from_dict(body)).to_dict()


def parts_of(part, prefix=""):
    """(dotted name, part) of a parsed document and every part inside it."""
    yield prefix, part
    for f in part.schema_fields():
        value = getattr(part, f.name)
        if hasattr(value, "schema_fields"):
            yield from parts_of(value, f"{prefix}{f.name}.")


# ----------------------------------------------------------------------------- version 1


def test_the_fixture_reads_as_version_1_and_writes_back_the_same_document(v1):
    metadata = VolumeMetadata.from_dict(v1)
    assert "schema_version" not in v1 and metadata.schema_version == 1
    assert metadata.to_dict() == v1
    assert canonical_json(metadata.to_dict()) == canonical_json(v1)
    assert metadata.is_intact and metadata_digest(v1) == v1["metadata_digest"]


def test_typed_accessors_of_the_fixture(v1):
    metadata = VolumeMetadata.from_dict(v1)
    assert metadata.shapes["features"] == (192, 8, 8, 8)
    assert metadata.configuration.fingerprint == v1["configuration"]["fingerprint"]
    assert metadata.integrity.crc32["features"] == {"0.0.0.0": 3297634715, "1.0.0.0": 2740067248}
    assert metadata.integrity.chunks["features"] == (96, 8, 8, 8)
    assert metadata.dtypes == {"features": "float16", "gt": "uint32", "mask": "uint8", "raw": "uint8"}
    assert metadata.storage.array_gb.keys() == {"features", "gt", "mask", "raw"}
    assert metadata.has_mask
    assert metadata.grid("features") == VoxelGrid((128.0,) * 3, (0.0,) * 3, (8, 8, 8))
    assert metadata.grid("mask") == metadata.grid("features")
    assert metadata.grid("raw") == VoxelGrid((32.0,) * 3, (0.0,) * 3, (32, 32, 32))


def test_version_1_keys_beyond_the_seed_are_optional(v1):
    """Files from before integrity records and provenance still read; they write back without them."""
    for name in ("dtypes", "integrity", "provenance", "metadata_digest"):
        del v1[name]
    del v1["configuration"]["fingerprint"]
    metadata = VolumeMetadata.from_dict(v1)
    assert metadata.integrity is None and metadata.configuration.fingerprint is None
    assert not metadata.is_intact
    assert metadata.to_dict() == v1


# ----------------------------------------------------------------------------- version 2


def test_a_version_2_document_is_written_in_the_seed_order_and_reads_back_equal(v2):
    keys = list(v2)
    assert keys[0] == "schema_version" and v2["schema_version"] == SCHEMA_VERSION == 3
    assert keys[-1] == "metadata_digest"
    assert [k for k in keys if k in SEED_ORDER] == SEED_ORDER
    metadata = VolumeMetadata.from_dict(v2)
    assert metadata.is_intact
    assert VolumeMetadata.from_dict(metadata.to_dict()) == metadata
    assert metadata.to_dict() == v2


def test_unknown_keys_survive_a_round_trip(v2):
    v2["written_by_a_newer_version"] = {"a": [1, 2]}
    v2["configuration"]["new_setting"] = 3
    v2["integrity"]["sha256"] = {"features": {}}
    v2["schema_version"] = SCHEMA_VERSION + 1
    metadata = VolumeMetadata.from_dict(v2)
    assert metadata.schema_version == SCHEMA_VERSION + 1
    assert metadata.configuration.extra == {"new_setting": 3}
    out = metadata.to_dict()
    assert out == v2 and list(out)[-1] == "metadata_digest"


def test_the_digest_detects_an_edit(v2):
    metadata = VolumeMetadata.from_dict(v2)
    edited = replace(metadata, volume_index=7)
    assert not edited.is_intact
    assert edited.sealed().is_intact
    v2["statistics"]["num_classes"] += 1
    assert not VolumeMetadata.from_dict(v2).is_intact


def test_a_parsed_document_does_not_share_mutable_values(v2):
    metadata = VolumeMetadata.from_dict(v2)
    v2["configuration"]["normalization"]["mean"][0] = 99.0
    metadata.to_dict()["configuration"]["normalization"]["mean"][0] = 98.0
    assert metadata.configuration.normalization["mean"][0] == 0.485


# ----------------------------------------------------------------------------- malformed


@pytest.mark.parametrize("path", [("shapes",), ("configuration", "model_id"), ("configuration", "fingerprint"),
                                  ("integrity", "crc32"), ("metadata_digest",), ("schema_version",)])
def test_a_missing_required_key_is_named(v2, path):
    doc = copy.deepcopy(v2)
    holder = doc
    for name in path[:-1]:
        holder = holder[name]
    del holder[path[-1]]
    if path == ("schema_version",):  # without it the document is version 1: the key is not required
        assert VolumeMetadata.from_dict(doc).schema_version == 1
        return
    with pytest.raises(MetadataError, match=rf"'{'.'.join(path)}' is missing") as caught:
        VolumeMetadata.from_dict(doc, "volume_000000_metadata.json")
    assert str(caught.value).startswith("volume_000000_metadata.json: ")
    assert caught.value.exit_status == EXIT_DAMAGED


@pytest.mark.parametrize("path, value, named", [
    (("volume_index",), "0", "volume_index"),
    (("volume_index",), True, "volume_index"),
    (("shapes",), {"features": ["a"]}, 'shapes["features"]'),
    (("configuration", "base_resolution"), None, "configuration.base_resolution"),
    (("configuration", "chunks"), "96,8,8,8", "configuration.chunks"),
    (("storage", "features_gb"), "1 GB", "storage.features_gb"),
    (("integrity", "crc32"), {"features": {"0.0.0.0": 1.5}}, 'integrity.crc32["features"]["0.0.0.0"]'),
    (("source_dataset",), [], "source_dataset"),
])
def test_a_value_of_the_wrong_type_is_named(v1, path, value, named):
    holder = v1
    for name in path[:-1]:
        holder = holder[name]
    holder[path[-1]] = value
    with pytest.raises(MetadataError) as caught:
        VolumeMetadata.from_dict(v1, "FILE")
    assert str(caught.value).startswith(f"FILE: key '{named}' must be ") or str(caught.value).startswith(
        f"FILE: {named} must be an object")
    assert caught.value.exit_status == EXIT_DAMAGED


@pytest.mark.parametrize("version", [0, "2", 1.5])
def test_a_bad_schema_version_is_named(v2, version):
    v2["schema_version"] = version
    with pytest.raises(MetadataError, match="'schema_version' must be an int >= 1"):
        VolumeMetadata.from_dict(v2)


def test_an_unreadable_file_is_named(tmp_path):
    path = tmp_path / "volume_000000_metadata.json"
    path.write_text('{"volume_index": 0,')
    with pytest.raises(MetadataError, match=f"metadata file {path} is unreadable"):
        load_volume_metadata(path)
    path.write_text("[1, 2]")
    with pytest.raises(MetadataError, match=f"{path}: the document must be an object, got list"):
        load_volume_metadata(path)


# ----------------------------------------------------------------------------- reference


def test_the_reference_lists_every_key(v1):
    reference = schema_reference()
    rows = [line for line in reference.splitlines() if line.startswith("| `")]
    listed = {row.split("`")[1] for row in rows}
    transform = AxisTransform().to_record({"labels": VoxelGrid.cube(128, (0, 0, 0), 16)})  # every optional part
    signature = {"format": 1, "source": "synthetic"}
    every_part = {**v1, "source_dataset": {**v1["source_dataset"], "world_transform": transform, "signature": signature}}
    expected = {f"{prefix}{(f.metadata['shown_as'] or (f.name,))[0]}"
                for prefix, part in parts_of(VolumeMetadata.from_dict(every_part)) for f in part.schema_fields()}
    assert listed == expected
    assert len(rows) == len(expected)
    assert "| `configuration.fingerprint` | string | from v2 |" in reference
    assert "| `storage.<array>_gb` | number, one key per array | always |" in reference


def test_the_world_transform_reads_typed_and_writes_back_the_same(v2):
    moved = AxisTransform((2, 0, 1), (True, False, True))
    record = moved.to_record({"labels": VoxelGrid.cube(128, (0, 0, 0), 16)})
    doc = {**v2, "source_dataset": {**v2["source_dataset"], "world_transform": record}}
    metadata = VolumeMetadata.from_dict(doc)
    assert isinstance(metadata.source_dataset.world_transform, WorldTransform)
    assert "world_transform" not in metadata.source_dataset.extra
    assert metadata.source_dataset.axis_transform == moved and metadata.to_dict() == doc
    assert VolumeMetadata.from_dict(v2).source_dataset.axis_transform == AxisTransform()  # absent: the identity
    bad = {**doc, "source_dataset": {**doc["source_dataset"], "world_transform": {**record, "flip": [1, 0, 0]}}}
    with pytest.raises(MetadataError, match=r"'source_dataset\.world_transform\.flip' must be list of bool"):
        VolumeMetadata.from_dict(bad)


def test_the_commit_id_is_read_through_the_schema(v1, v2):
    assert VolumeMetadata.from_dict(v2).commit_id == v2["integrity"]["commit_id"]
    without = {k: v for k, v in v1.items() if k not in ("integrity", "metadata_digest")}
    assert VolumeMetadata.from_dict(without).commit_id is None  # version 1 files may have none


# ----------------------------------------------------------------------------- real caches


def test_the_writer_records_no_key_the_schema_does_not_know(tmp_path, tiny_model_dir):
    out = tmp_path / "cache"
    call_main("preprocess_volume", *preprocess_args(out, 0, tiny_model_dir, "--save-raw"), check=True)
    doc = read_json(VolumePaths(out, 0).metadata)
    metadata = VolumeMetadata.from_dict(doc)
    assert metadata.to_dict() == doc and metadata.is_intact
    unknown = {f"{prefix}{k}" for prefix, part in parts_of(metadata)
               if not isinstance(part, SourceDataset) for k in part.extra}  # sources add their own keys
    assert unknown == set()
    assert isinstance(metadata.source_dataset.world_transform, WorldTransform)  # typed, not kept as an unknown key
    assert VolumeMetadata.from_dict(VolumeMetadata.build(metadata).to_dict()).schema_version == SCHEMA_VERSION
    assert isinstance(metadata.storage, Storage) and metadata.storage.bytes["features"] > 0


@pytest.fixture
def fixture_copy(tmp_path) -> Path:
    copied = tmp_path / "cache_v1"
    shutil.copytree(FIXTURE, copied)
    return copied


def test_the_version_1_fixture_loads(fixture_copy):
    from preprocessed_dataloader import PreprocessedDINOv3Dataset

    dataset = PreprocessedDINOv3Dataset(fixture_copy)
    features, gt, mask = dataset[0]
    assert tuple(features.shape) == (192, 8, 8, 8) and tuple(gt.shape) == tuple(mask.shape) == (8, 8, 8)


def test_the_version_1_fixture_verifies(fixture_copy):
    result = call_main("check_preprocessing", "--output-dir", fixture_copy, "--verify-all", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["verification"]["checked"] == 1 and report["verification"]["failed"] == []
    assert report["verification"]["volumes"][0]["arrays"]["features"]["chunks_checked"] == 2
