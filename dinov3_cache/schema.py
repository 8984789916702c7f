"""The per-volume metadata file (`volume_XXXXXX_metadata.json`, the commit marker) as typed,
versioned data: one definition of every key, its type, meaning and the version that requires it.

`VolumeMetadata.from_dict` reads every version: files without `schema_version` are version 1
(their extra keys are optional, so older files still read); version 2 adds `schema_version`
and requires every key the writer records. Keys this module does not know are kept in each
part's `extra` and written back, so a document from a newer writer survives a read and a
rewrite here. `to_dict` writes the seed's key order with `metadata_digest` last; a parsed
document writes back to an equal dict, so its digest still holds.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from dinov3_cache.geometry import AxisTransform, VoxelGrid
from dinov3_cache.json_schema import (
    BOOL,
    INT,
    NUMBER,
    OBJECT,
    STRING,
    MetadataError,
    Part,
    Reading,
    describe,
    json_key,
    list_of,
    map_of,
    nullable,
    parse_value,
)
from dinov3_cache.records import canonical_json
from dinov3_cache.storage import FeatureStorage, UnknownStorageForm, storage_for, storage_form_names

SCHEMA_VERSION = 3  # 3: source_dataset.signature
METADATA_DIGEST_KEY = "metadata_digest"


# ----------------------------------------------------------------------------- digest and fingerprint


def metadata_digest(metadata: dict) -> str:
    """sha256 of the metadata without its own digest: any edit of the file changes it."""
    body = {k: v for k, v in metadata.items() if k != METADATA_DIGEST_KEY}
    return hashlib.sha256(canonical_json(body).encode()).hexdigest()


def seal_metadata(metadata: dict) -> dict:
    return {**metadata, METADATA_DIGEST_KEY: metadata_digest(metadata)}


def metadata_is_intact(metadata: dict) -> bool:
    return metadata.get(METADATA_DIGEST_KEY) == metadata_digest(metadata)


def config_fingerprint(values: dict) -> str:
    """Fingerprint of the settings that decide the feature values (not their storage)."""
    return hashlib.sha256(canonical_json(values).encode()).hexdigest()[:16]


@dataclass(frozen=True, kw_only=True)
class WorldTransform(Part):
    """Which world voxel each stored index shows (geometry.AxisTransform): the identity unless
    the crop was augmented (flipped and transposed inside its bounding box)."""

    axis_order: tuple[int, ...] = json_key("stored = transpose(unaugmented, axis_order), then the flips", list_of(INT))
    flip: tuple[bool, ...] = json_key("the stored axes flipped after the transpose", list_of(BOOL))
    rule: str = json_key("the rule in words", STRING)
    affine_nm: dict[str, tuple[tuple[float, ...], ...]] = json_key(
        "per grid ('labels', 'raw'): 4x4 matrix from a stored voxel index (z, y, x, 1) to the world nm of its centre",
        map_of(list_of(list_of(NUMBER))))

    @property
    def axis_transform(self) -> AxisTransform:
        return AxisTransform(self.axis_order, self.flip)


@dataclass(frozen=True, kw_only=True)
class SourceSignature(Part):
    """What the source held when the crop was read (sources/signatures.py); the source that
    wrote it re-checks it (check_preprocessing.py --check-sources) and reads its other keys."""

    format: int = json_key("format of the signature (1)", INT)
    source: str = json_key("the source that wrote it and re-checks it ('cellmap', 'synthetic')", STRING)
    arrays: dict | None = json_key(
        "CellMap: per array read ('raw', each organelle): url, group, level, driver, axis_order, metadata (sha256 of "
        "each metadata document), selection (level voxels read per axis) and chunks (per storage chunk touched: size, "
        "mtime_ns and sha256 of a local file or etag of an S3 object, values_sha256 of the values the crop read; "
        "digests: sha256's first 128 bits in hex)",
        map_of(OBJECT), since=None)
    generator: dict | None = json_key("synthetic: the generator's name and version", OBJECT, since=None)
    parameters: dict | None = json_key("synthetic: the generator's parameters (geometry, organelles, filters)", OBJECT, since=None)
    seed: tuple[int, ...] | None = json_key("synthetic: the seed of the generator (volume index, stream)", list_of(INT), since=None)


@dataclass(frozen=True, kw_only=True)
class SourceDataset(Part):
    """Where the crop came from; sources add their own keys (kept in `extra`)."""

    index: int = json_key("index of the crop in the source's list of candidates", INT)
    name: str | None = json_key("source or dataset name", STRING, since=None)
    paths: dict[str, str] = json_key("URL or path of each source array (raw and each organelle)", map_of(STRING))
    voxel_size_nm: dict | None = json_key("voxel size (nm, z y x) of the raw and label data read", OBJECT, since=None)
    offset_nm: tuple[float, ...] | None = json_key("world corner (nm, z y x) of the crop", list_of(NUMBER), since=None)
    world_transform: WorldTransform | None = json_key(
        "where the stored voxels sit in the world (absent: the identity)", WorldTransform, since=None)
    signature: SourceSignature | None = json_key(
        "what the source held when read (absent: written before version 3, or by a source that cannot sign)",
        SourceSignature, since=None)

    @classmethod
    def from_description(cls, description: dict) -> SourceDataset:
        """A source's description of its crop (SourceCrop.description), checked as a new document's."""
        return cls._parse(description, Reading("new metadata", SCHEMA_VERSION), "source_dataset")

    @property
    def axis_transform(self) -> AxisTransform:
        """Where the stored voxels sit: the recorded transform, else the identity."""
        return self.world_transform.axis_transform if self.world_transform is not None else AxisTransform()


@dataclass(frozen=True, kw_only=True)
class Configuration(Part):
    """The settings of the run; `fingerprint` covers those that decide the feature values."""

    model_id: str = json_key("Hugging Face id or local directory of the DINOv3 model", STRING)
    model_revision: str | None = json_key("hub revision asked for (null: default branch)", nullable(STRING), since=2)
    pretrained: bool = json_key("false for a random-weight test model", BOOL, since=2)
    base_resolution: float = json_key("label and feature voxel size (nm)", NUMBER)
    min_resolution_for_raw: float = json_key("raw voxel size (nm) the slices are read at", NUMBER, since=2)
    output_image_dim: int = json_key("features, gt and mask edge length (voxels)", INT, since=2)
    slice_size: int = json_key("edge length (pixels) of each slice given to the model", INT, since=2)
    patch_size: int = json_key("the model's patch size (pixels)", INT, since=2)
    planes: tuple[str, ...] = json_key("slicing planes averaged into the features", list_of(STRING), since=2)
    plane_combination: str = json_key("how the planes are combined", STRING, since=2)
    slice_reduction: str = json_key("how raw is reduced to label resolution along the plane normal", STRING, since=2)
    upsampling: str = json_key("how token grids are upsampled to the output size", STRING, since=2)
    normalization: dict = json_key("image normalisation (family, mean, std)", OBJECT, since=2)
    intensity_range: tuple[float, ...] = json_key("raw intensity range mapped to [0, 1]", list_of(NUMBER), since=2)
    organelles: tuple[str, ...] = json_key("label classes, in --organelles order", list_of(STRING), since=2)
    gt_extension: bool = json_key("whether a valid-label mask was written", BOOL, since=2)
    filters: dict = json_key("crop acceptance thresholds", OBJECT, since=2)
    features_dtype: str = json_key("stored feature dtype", STRING, since=2)
    compression: str = json_key("compression of the arrays", STRING)
    zarr_format: int = json_key("zarr format of the arrays (2 or 3)", INT, since=2)
    layout: str | None = json_key(
        "the storage form of the features (--layout): 'dense' (features array) or 'tokens' (tokens array); absent: dense",
        STRING, since=None)
    chunks: tuple[int, ...] = json_key(
        "chunk shape of the features (C, Z, Y, X) or, in the tokens layout, of the tokens (1, C, slice, a, b)", list_of(INT))
    codecs: dict = json_key("the features (or tokens) array's codec chain as written", OBJECT, since=2)
    batch_size: int = json_key("slices per forward pass", INT, since=2)
    device: str = json_key("device the model ran on", STRING, since=2)
    compute_dtype: str = json_key("dtype of the forward pass", STRING, since=2)
    execution: dict | None = json_key(
        "how the model ran (attention kernel, RoPE tables cached, compiled); not in the fingerprint", OBJECT, since=None)
    voxel_size_nm: dict[str, tuple[float, ...]] = json_key(
        "voxel size (nm, z y x): 'features' (also gt, mask) and 'raw'", map_of(list_of(NUMBER)), since=2)
    offset_nm: tuple[float, ...] = json_key("world corner (nm, z y x) of every array", list_of(NUMBER), since=2)
    fingerprint: str = json_key("hash of fingerprint_inputs: volumes with equal ones can be mixed", STRING, since=2)
    fingerprint_inputs: dict = json_key("the settings that decide the feature values", OBJECT, since=2)


ARRAY_GB = re.compile(r"^(?P<array>.+)_gb$")


@dataclass(frozen=True, kw_only=True)
class Storage(Part):
    """Space on disk per array (as du counts it)."""

    array_gb: dict[str, float] = json_key("GB on disk of each array", map_of(NUMBER),
                                         shown_as=("<array>_gb", "number, one key per array"))
    total_gb: float = json_key("GB on disk of all arrays", NUMBER)
    bytes: dict[str, int] = json_key("bytes on disk of each array", map_of(INT), since=2)

    @classmethod
    def _prepare(cls, doc: dict, reading: Reading, where: str) -> dict:
        per_array = {m["array"]: v for k, v in doc.items() if k != "total_gb" and (m := ARRAY_GB.match(k))}
        for name, gb in per_array.items():
            parse_value(NUMBER, gb, reading, f"{where}.{name}_gb")
        rest = {k: v for k, v in doc.items() if k == "total_gb" or not ARRAY_GB.match(k)}
        return {"array_gb": per_array, **rest}

    def _finish(self, doc: dict) -> dict:
        per_array = doc.pop("array_gb", None) or {}
        return {f"{name}_gb": gb for name, gb in per_array.items()} | doc


@dataclass(frozen=True, kw_only=True)
class Statistics(Part):
    """Label and feature statistics of the crop."""

    num_classes: int = json_key("distinct label values inside the mask", INT)
    unique_classes: tuple[int, ...] = json_key("those values (at most 1000)", list_of(INT))
    valid_gt_fraction: float = json_key("fraction of voxels with valid labels (mask mean)", NUMBER)
    features: dict = json_key(
        "mean, std, min, max, non_finite of the stored features (tokens layout: of the token values; {} when empty)",
        OBJECT, since=2)


@dataclass(frozen=True, kw_only=True)
class Integrity(Part):
    """What verification compares the arrays with."""

    commit_id: str = json_key("id of the run, also in every array's attributes", STRING)
    algorithm: str = json_key("how the chunk checksums are computed", STRING)
    chunks: dict[str, tuple[int, ...]] = json_key("chunk shape of each array", map_of(list_of(INT)))
    crc32: dict[str, dict[str, int]] = json_key("checksum of every chunk, by array and chunk key", map_of(map_of(INT)))


@dataclass(frozen=True, kw_only=True)
class Provenance(Part):
    """Who made the volume, with what."""

    model: dict = json_key("the model's identity (id, revision, pretrained, config)", OBJECT)
    versions: dict = json_key("versions of python, torch, transformers, tensorstore, numpy", map_of(nullable(STRING)))
    host: str = json_key("host the run ran on", STRING)
    job_id: str | None = json_key("batch scheduler job id (null outside a scheduler)", nullable(STRING))
    command: tuple[str, ...] = json_key("the command line", list_of(STRING))


@dataclass(frozen=True, kw_only=True)
class VolumeMetadata(Part):
    """The whole document. Parts absent from a version 1 file are None."""

    schema_version: int = json_key("version of this document's schema (absent: 1)", INT, since=2)
    volume_index: int = json_key("the volume's index", INT)
    volume_name: str = json_key("the volume's name, volume_ and the index in six or more digits", STRING)
    timestamp: str = json_key("when the volume was committed (ISO 8601)", STRING)
    paths: dict[str, str] = json_key("absolute path of each array when written", map_of(STRING))
    source_dataset: SourceDataset = json_key("where the crop came from", SourceDataset)
    shapes: dict[str, tuple[int, ...]] = json_key(
        "shape of each array: features (C, D, H, W) (also in the tokens layout: what it delivers), "
        "tokens (P, C, D, g, g), gt and mask (D, H, W), raw (S, S, S)", map_of(list_of(INT)))
    dtypes: dict[str, str] = json_key("numpy dtype name of each stored array", map_of(STRING), since=2)
    configuration: Configuration = json_key("settings of the run", Configuration)
    timing: dict[str, float] = json_key("seconds per stage (model_load, source_read, feature_extraction, ...)",
                                   map_of(NUMBER))
    storage: Storage = json_key("space on disk", Storage)
    statistics: Statistics = json_key("label and feature statistics", Statistics)
    integrity: Integrity | None = json_key("commit id and chunk checksums", Integrity, since=2)
    provenance: Provenance | None = json_key("model identity, versions, host, job, command", Provenance, since=2)
    metadata_digest: str | None = json_key("sha256 of the document without this key", STRING, since=2)

    @classmethod
    def from_dict(cls, doc: Any, source: str | Path = "metadata") -> VolumeMetadata:
        """Parse a document of any version; MetadataError (naming source and key) if malformed."""
        source = str(source)
        if not isinstance(doc, dict):
            raise MetadataError(f"{source}: the document must be an object, got {describe(doc)}")
        version = doc.get("schema_version", 1)
        if not INT.check(version) or version < 1:
            raise MetadataError(f"{source}: key 'schema_version' must be an int >= 1, got {describe(version)}")
        parsed = cls._parse(doc, Reading(source, min(version, SCHEMA_VERSION)), "")
        return replace(parsed, schema_version=version)

    @classmethod
    def build(cls, metadata: VolumeMetadata) -> VolumeMetadata:
        """A new document of the current version as the writer made it, checked against the
        schema (and its values held as every reader holds them: lists as tuples), and sealed."""
        unsealed = replace(metadata, schema_version=SCHEMA_VERSION, metadata_digest="",
                           absent=metadata.absent - {"schema_version", METADATA_DIGEST_KEY})
        return cls.from_dict(unsealed.to_dict(), "new metadata").sealed()

    def to_dict(self) -> dict:
        doc = super().to_dict()  # a version 1 file has no schema_version: it stays absent
        digest = doc.pop(METADATA_DIGEST_KEY, None)
        return doc if METADATA_DIGEST_KEY in self.absent else doc | {METADATA_DIGEST_KEY: digest}

    def sealed(self) -> VolumeMetadata:
        digest = metadata_digest(self.to_dict())
        return replace(self, metadata_digest=digest, absent=self.absent - {METADATA_DIGEST_KEY})

    @property
    def is_intact(self) -> bool:
        """The recorded digest matches the document (False when there is none)."""
        return metadata_is_intact(self.to_dict())

    @property
    def commit_id(self) -> str | None:
        """The id of the commit that wrote the volume (None in version 1 files, which have none)."""
        return self.integrity.commit_id if self.integrity is not None else None

    @property
    def storage_form(self) -> FeatureStorage:
        """How the features are stored (configuration.layout; files written before it was
        recorded: the default form)."""
        try:
            return storage_for(self.configuration.layout)
        except UnknownStorageForm:
            raise MetadataError(
                f"volume {self.volume_index}: configuration.layout {self.configuration.layout!r} is no storage form this "
                f"version knows ({', '.join(storage_form_names())})") from None

    @property
    def has_mask(self) -> bool:
        return "mask" in self.paths

    def grid(self, array: str) -> VoxelGrid:
        """Where `array` sits in world space; gt, mask and features share the features' grid."""
        shape = self.shapes.get(array)
        voxel = (self.configuration.voxel_size_nm or {}).get("raw" if array == "raw" else "features")
        offset = self.configuration.offset_nm
        if shape is None or voxel is None or offset is None:
            raise MetadataError(
                f"volume {self.volume_index}: metadata records no shape, voxel_size_nm or offset_nm for '{array}'")
        return VoxelGrid(tuple(voxel), tuple(offset), tuple(shape[-3:]))


def load_volume_metadata(path: Path | str) -> VolumeMetadata:
    """Read and parse one metadata file; MetadataError names the file when it cannot."""
    return VolumeMetadata.from_dict(read_metadata_document(path)[0], path)


def read_metadata_document(path: Path | str) -> tuple[Any, os.stat_result]:
    """One metadata file's JSON document, and the stat of the very file it was read from (a
    commit may replace the file at any time: the stat is taken from the open file, not the path)."""
    try:
        with open(path) as f:
            return json.load(f), os.fstat(f.fileno())
    except (OSError, ValueError) as e:
        raise MetadataError(f"metadata file {path} is unreadable ({e})") from None


# ----------------------------------------------------------------------------- reference


REQUIRED = {1: "always", None: "optional"}


def schema_reference() -> str:
    """A Markdown table of every key: dotted name, type, when required, meaning."""
    lines = [
        f"Schema version {SCHEMA_VERSION}; a file without `schema_version` is version 1. "
        "Required: `always` (where the object holding the key is present), `from vN` (in files of "
        "version N and later), or `optional`. "
        "Unknown keys are kept as written.",
        "",
        "| key | type | required | meaning |",
        "| --- | --- | --- | --- |",
    ]
    lines += _reference_rows(VolumeMetadata, "")
    return "\n".join(lines) + "\n"


def _reference_rows(part: type, prefix: str) -> list[str]:
    rows = []
    for f in part.schema_fields():
        kind, since = f.metadata["kind"], f.metadata["since"]
        name, kind_name = f.metadata["shown_as"] or (f.name, f"object ({kind.__name__})" if isinstance(kind, type) else kind.name)
        name = prefix + name
        required = REQUIRED.get(since, f"from v{since}")
        rows.append(f"| `{name}` | {kind_name} | {required} | {f.metadata['doc']} |")
        if isinstance(kind, type):
            rows += _reference_rows(kind, f"{name}.")
    return rows
