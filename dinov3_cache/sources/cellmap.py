"""Training crops from CellMap-layout data: OME-NGFF multiscale zarr (or N5), local or on S3.

Layout under a data root (a directory or ``s3://bucket/prefix``)::

    ROOT/<dataset>/<dataset>.zarr/recon-1/em/fibsem-uint8                       raw, multiscale
    ROOT/<dataset>/<dataset>.zarr/recon-1/labels/groundtruth/crop<N>/<organelle>  annotated crops
    ROOT/<dataset>/<dataset>.zarr/recon-1/labels/inference/segmentations/<organelle>

(``<dataset>.n5`` containers are read the same way.) The datasets found are listed once
in a catalog (``cellmap_catalog.json`` in the output directory) that every job reads;
``--catalog FILE`` gives one by hand for data in another layout.

Geometry is in world units (nm), taken from each group's multiscale metadata, never from
level names. OME-NGFF ``translation`` is the centre of voxel 0 (how CellMap pyramids are
written: level k's translation is level 0's plus (scale_k - scale_0) / 2), so voxel i of
a level covers [translation - scale/2 + i*scale, ... + scale). For each array the level
whose voxel size matches the target is read; where none matches, the coarsest level that
is finer on every axis is read and resampled (area mean for raw, nearest voxel centre for
labels); both choices are recorded in ``source_dataset``.

A crop window (``output_image_dim * base_resolution`` nm per axis) starts on the grid of
``base_resolution`` steps from the raw level's first voxel corner, lies inside the raw
array, and overlaps the annotated box (GT extension) or lies inside it
(``--no-gt-extension``). Labels are valid inside every requested label array's extent.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import tensorstore as ts

from dinov3_cache.layout import canonical_json, write_json_atomic
from dinov3_cache.sources.base import (
    DATA_ROOT_ENV,
    CropGeometry,
    SamplingOptions,
    SourceCrop,
    SourceError,
    VolumeSource,
    combine_organelle_labels,
    draw_passing_crop,
)

log = logging.getLogger("cellmap_source")

CATALOG_FILE_NAME = "cellmap_catalog.json"
CATALOG_FORMAT = "dinov3-cellmap-catalog"
CATALOG_VERSION = 1
CONTAINER_SUFFIXES = (".zarr", ".n5")
RECON = "recon-1"
RAW_ARRAY_NAMES = ("fibsem-uint8", "fibsem-uint16")  # first found is used
GROUNDTRUTH_DIR = f"{RECON}/labels/groundtruth"
INFERENCE_DIR = f"{RECON}/labels/inference/segmentations"
INFERENCE_CROP = "inference"  # the crop name of a dataset's inference labels
AUGMENT_STREAM = 1  # draw_passing_crop uses stream 0 of the index's generator
S3_DEFAULT_REGION = "us-east-1"
TOLERANCE = 1e-6
MAX_RAW_READ_BYTES = 8 * 2**30  # a finer level read for resampling must fit in memory
UNIT_TO_NM = {"nanometer": 1.0, "nm": 1.0, "micrometer": 1000.0, "um": 1000.0, "angstrom": 0.1}
AXES = ("z", "y", "x")


# ----------------------------------------------------------------------------- options


def add_cellmap_arguments(parser: argparse.ArgumentParser, add_pass_through) -> None:
    """The CellMap source's options; all but --refresh-catalog travel to every job."""
    add_pass_through(
        parser, "--data-root", default=None,
        help=f"CellMap-layout data: a directory or s3://bucket/prefix (default ${DATA_ROOT_ENV})",
    )
    add_pass_through(parser, "--catalog", default=None, help="JSON or CSV file listing raw and label arrays per dataset")
    add_pass_through(
        parser, "--s3-endpoint", default=None,
        help="endpoint URL of an S3-compatible store (default AWS); credentials from AWS_* variables, else anonymous",
    )
    add_pass_through(
        parser, "--augment", action="store_true",
        help="flips, axis swaps and intensity changes seeded by the volume index, recorded in metadata",
    )
    parser.add_argument(
        "--refresh-catalog", action="store_true",
        help=f"rescan --data-root and rewrite OUTPUT_DIR/{CATALOG_FILE_NAME} before sampling",
    )


# ----------------------------------------------------------------------------- locations


@dataclass(frozen=True)
class S3Options:
    """How s3:// URLs are reached. Credentials: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY
    (or AWS_PROFILE) when set, anonymous otherwise (public buckets)."""

    endpoint: str | None = None
    region: str = field(default_factory=lambda: os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or S3_DEFAULT_REGION)
    retries: int = 4

    @property
    def anonymous(self) -> bool:
        return not (os.environ.get("AWS_ACCESS_KEY_ID") or os.environ.get("AWS_PROFILE"))

    def credentials_spec(self) -> dict:
        if self.anonymous:
            return {"type": "anonymous"}
        return {"type": "environment"} if os.environ.get("AWS_ACCESS_KEY_ID") else {"type": "default"}

    def where(self) -> str:
        return self.endpoint or "AWS S3"


def is_s3(url: str) -> bool:
    return url.startswith("s3://")


def split_s3(url: str) -> tuple[str, str]:
    bucket, _, key = url[len("s3://"):].partition("/")
    if not bucket:
        raise SourceError(f"{url!r} names no bucket; write s3://bucket/prefix")
    return bucket, key.strip("/")


def join_url(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts if p)])


def is_absolute(url: str) -> bool:
    return url.startswith("/") or "://" in url


def kvstore_spec(url: str, s3: S3Options) -> dict:
    """TensorStore kvstore for a directory URL (local path or s3://)."""
    if not is_s3(url):
        return {"driver": "file", "path": url.rstrip("/") + "/"}
    bucket, key = split_s3(url)
    spec = {
        "driver": "s3", "bucket": bucket, "path": key + "/" if key else "",
        "aws_region": s3.region, "aws_credentials": s3.credentials_spec(),
    }
    if s3.endpoint:
        spec["endpoint"] = s3.endpoint
    return spec


def tensorstore_context(s3: S3Options, num_threads: int = 8) -> ts.Context:
    # bounded retries: an unreachable endpoint fails within seconds instead of minutes
    return ts.Context({
        "s3_request_retries": {"max_retries": s3.retries, "initial_delay": "0.2s", "max_delay": "4s"},
        "data_copy_concurrency": {"limit": num_threads},
        "file_io_concurrency": {"limit": num_threads},
    })


def storage_error(url: str, error: Exception, s3: S3Options) -> SourceError:
    """One line for a TensorStore failure: unreachable endpoint, denied, or anything else."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if "CURL error" in text or "Could not connect" in text or "Could not resolve" in text:
        return SourceError(
            f"cannot reach the S3 endpoint {s3.where()} for {url} ({text[-160:]}); check --s3-endpoint and the network"
        )
    if "PERMISSION_DENIED" in text or "403" in text:
        return SourceError(
            f"access to {url} denied ({text[:160]}); set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY for a private bucket"
        )
    return SourceError(f"cannot read {url}: {text[:200]}")


class Storage:
    """Small-file reads and directory listings for local paths and s3:// URLs."""

    def __init__(self, s3: S3Options | None = None, num_threads: int = 8):
        self.s3 = s3 or S3Options()
        self.context = tensorstore_context(self.s3, num_threads)

    def read_json(self, url: str) -> dict | None:
        """The JSON document at url, None if there is none; SourceError if unreadable."""
        directory, _, name = url.rpartition("/")
        try:
            kv = ts.KvStore.open(kvstore_spec(directory, self.s3), context=self.context).result()
            result = kv.read(name).result()
        except (ValueError, RuntimeError) as e:
            raise storage_error(url, e, self.s3) from None
        if result.state != "value":
            return None
        try:
            value = json.loads(result.value)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SourceError(f"{url} is not valid JSON ({e}); repair or remove it") from None
        return value

    def list_dirs(self, url: str) -> list[str]:
        """Names of the sub-directories (S3: common prefixes) of url, sorted."""
        if not is_s3(url):
            try:
                return sorted(e.name for e in os.scandir(url) if e.is_dir())
            except FileNotFoundError:
                return []
            except OSError as e:
                raise SourceError(f"cannot list {url} ({e.strerror})") from None
        return sorted(self._s3_prefixes(url))

    def _s3_prefixes(self, url: str) -> Iterable[str]:
        # A delimiter listing returns one entry per sub-directory, not every chunk below it.
        bucket, key = split_s3(url)
        prefix = key + "/" if key else ""
        client = self._s3_client()
        import botocore.exceptions as bex

        try:
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, Delimiter="/"):
                for common in page.get("CommonPrefixes", []):
                    yield common["Prefix"][len(prefix):].rstrip("/")
        except (bex.EndpointConnectionError, bex.ConnectTimeoutError, bex.ReadTimeoutError) as e:
            raise SourceError(f"cannot reach the S3 endpoint {self.s3.where()} ({e}); check --s3-endpoint and the network") from None
        except bex.ClientError as e:
            code = e.response.get("Error", {}).get("Code", "error")
            raise SourceError(f"cannot list {url} on {self.s3.where()} ({code}); check the bucket name and credentials") from None
        except bex.BotoCoreError as e:
            raise SourceError(f"cannot list {url} on {self.s3.where()} ({e}); check the AWS_* variables and --s3-endpoint") from None

    def _s3_client(self):
        try:
            import boto3
            from botocore import UNSIGNED
            from botocore.config import Config
        except ImportError:
            raise SourceError("scanning an s3:// data root needs boto3 (pip install boto3), or pass --catalog FILE") from None
        config = Config(
            connect_timeout=5, read_timeout=30, retries={"max_attempts": self.s3.retries},
            signature_version=UNSIGNED if self.s3.anonymous else None,
        )
        try:
            return boto3.client("s3", endpoint_url=self.s3.endpoint, region_name=self.s3.region, config=config)
        except Exception as e:  # botocore raises many kinds here (bad profile, bad endpoint URL)
            raise SourceError(f"cannot set up an S3 client for {self.s3.where()} ({e}); check the AWS_* variables and --s3-endpoint") from None


# ----------------------------------------------------------------------------- multiscale metadata


@dataclass(frozen=True)
class Level:
    """One level of a multiscale group, in z, y, x order and nm."""

    path: str
    scale: tuple[float, float, float]
    translation: tuple[float, float, float]

    @property
    def corner(self) -> np.ndarray:
        """World position of voxel 0's first corner (translation is its centre)."""
        return np.asarray(self.translation) - np.asarray(self.scale) / 2


@dataclass(frozen=True)
class Multiscale:
    url: str
    driver: str  # zarr | zarr3 | n5
    levels: tuple[Level, ...]
    axis_order: tuple[int, ...]  # stored axis positions of z, y, x


def read_multiscale(url: str, storage: Storage) -> Multiscale:
    """The levels of the multiscale group at url, from its OME-NGFF (or CellMap N5) metadata."""
    for name, driver in ((".zattrs", "zarr"), ("zarr.json", "zarr3"), ("attributes.json", "n5")):
        document = storage.read_json(join_url(url, name))
        if document is not None:
            attributes = document.get("attributes", {}) if driver == "zarr3" else document
            return parse_multiscale(url, driver, attributes)
    raise SourceError(f"no multiscale group at {url} (no .zattrs, zarr.json or attributes.json); check the path")


def parse_multiscale(url: str, driver: str, attributes: dict) -> Multiscale:
    def corrupt(why: str) -> SourceError:
        return SourceError(f"corrupt multiscale metadata at {url}: {why}; fix its OME-NGFF 'multiscales' attribute")

    multiscales = attributes.get("multiscales") or attributes.get("ome", {}).get("multiscales")
    if not isinstance(multiscales, list) or not multiscales or not isinstance(multiscales[0], dict):
        raise corrupt("no 'multiscales' list")
    meta = multiscales[0]
    names, factors = axis_names_and_units(meta.get("axes"), corrupt)
    datasets = meta.get("datasets")
    if not isinstance(datasets, list) or not datasets:
        raise corrupt("no 'datasets' levels")
    global_scale, global_translation = transforms_of(meta.get("coordinateTransformations") or [], len(names), corrupt)
    levels = []
    for entry in datasets:
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            raise corrupt("a level without 'path'")
        if "transform" in entry:  # CellMap's N5 convention
            transform = entry["transform"] if isinstance(entry["transform"], dict) else {}
            listed = {k: transform.get(k) for k in ("axes", "units", "scale", "translate")}
            if transform.get("ordering") == "F":  # listed fastest-first: back to C order
                listed = {k: v[::-1] if isinstance(v, list) else v for k, v in listed.items()}
            names, factors = axis_names_and_units(listed["axes"], corrupt, listed["units"])
            scale, translation = transforms_of(
                [{"type": "scale", "scale": listed["scale"]}, {"type": "translation", "translation": listed["translate"] or [0] * 3}],
                len(names), corrupt,
            )
        else:
            scale, translation = transforms_of(entry.get("coordinateTransformations"), len(names), corrupt, need_scale=True)
        scale, translation = scale * global_scale, translation * global_scale + global_translation
        if np.any(scale <= 0):
            raise corrupt(f"level {entry['path']} has a non-positive scale {scale.tolist()}")
        order = [names.index(a) for a in AXES]
        levels.append(Level(
            entry["path"],
            tuple(float(scale[i] * factors[i]) for i in order),
            tuple(float(translation[i] * factors[i]) for i in order),
        ))
    return Multiscale(url, driver, tuple(levels), tuple(names.index(a) for a in AXES))


def axis_names_and_units(axes: Any, corrupt, units: Any = None) -> tuple[list[str], list[float]]:
    """Axis names and nm per unit; missing axes mean z, y, x in nm (CellMap's convention)."""
    if axes is None:
        return list(AXES), [1.0] * 3
    if not isinstance(axes, list):
        raise corrupt("'axes' is not a list")
    names = [a.get("name") if isinstance(a, dict) else a for a in axes]
    if sorted(map(str, names)) != sorted(AXES):
        raise corrupt(f"axes {names} are not the three spatial axes z, y, x")
    unit_names = units or [a.get("unit", "nanometer") if isinstance(a, dict) else "nanometer" for a in axes]
    unknown = [u for u in unit_names if u not in UNIT_TO_NM]
    if unknown:
        raise corrupt(f"unknown unit(s) {unknown}; use nanometer")
    return names, [UNIT_TO_NM[u] for u in unit_names]


def transforms_of(transforms: Any, n: int, corrupt, need_scale: bool = False) -> tuple[np.ndarray, np.ndarray]:
    scale, translation = np.ones(n), np.zeros(n)
    if not isinstance(transforms, list):
        raise corrupt("a level without 'coordinateTransformations'")
    kinds = set()
    for t in transforms:
        kind = t.get("type") if isinstance(t, dict) else None
        if kind not in ("scale", "translation"):
            raise corrupt(f"unsupported coordinate transformation {t!r}")
        values = t.get(kind)
        if not isinstance(values, list) or len(values) != n or not all(isinstance(v, (int, float)) for v in values):
            raise corrupt(f"{kind} {values!r} is not {n} numbers")
        kinds.add(kind)
        if kind == "scale":
            scale = np.asarray(values, float)
        else:
            translation = np.asarray(values, float)
    if need_scale and "scale" not in kinds:
        raise corrupt("a level without a 'scale' transformation")
    return scale, translation


def choose_level(multiscale: Multiscale, target_nm: float, what: str, option: str) -> tuple[Level, bool]:
    """The level at target_nm on every axis, else the coarsest finer one (resampled: True)."""
    for level in multiscale.levels:
        if all(abs(s - target_nm) <= TOLERANCE * target_nm for s in level.scale):
            return level, False
    finer = [lv for lv in multiscale.levels if all(s <= target_nm * (1 + TOLERANCE) for s in lv.scale)]
    if not finer:
        finest = min(multiscale.levels, key=lambda lv: max(lv.scale))
        raise SourceError(
            f"{what} at {target_nm:g} nm ({option}) is finer than every level of {multiscale.url} "
            f"(finest {format_voxel(finest.scale)} nm); use {option} {max(finest.scale):g} or coarser"
        )
    return max(finer, key=lambda lv: np.prod(lv.scale)), True


def format_voxel(scale: Sequence[float]) -> str:
    return "x".join(f"{s:g}" for s in scale)


@dataclass
class LevelArray:
    """One opened level, indexed z, y, x, with its world placement."""

    multiscale: Multiscale
    level: Level
    resampled: bool
    store: ts.TensorStore

    @property
    def url(self) -> str:
        return join_url(self.multiscale.url, self.level.path)

    @property
    def shape(self) -> np.ndarray:
        return np.asarray(self.store.shape)

    @property
    def lo(self) -> np.ndarray:
        return self.level.corner

    @property
    def hi(self) -> np.ndarray:
        return self.level.corner + self.shape * np.asarray(self.level.scale)

    def describe(self) -> dict:
        return {
            "group": self.multiscale.url,
            "level": self.level.path,
            "voxel_size_nm": list(self.level.scale),
            "translation_nm": list(self.level.translation),
            "shape": self.shape.tolist(),
            "resampled": self.resampled,
        }


def open_level(multiscale: Multiscale, target_nm: float, what: str, option: str, storage: Storage) -> LevelArray:
    level, resampled = choose_level(multiscale, target_nm, what, option)
    url = join_url(multiscale.url, level.path)
    try:
        store = ts.open(
            {"driver": multiscale.driver, "kvstore": kvstore_spec(url, storage.s3), "open": True},
            read=True, write=False, context=storage.context,
        ).result()
    except (ValueError, RuntimeError) as e:
        if "NOT_FOUND" in str(e):
            raise SourceError(f"level {level.path} listed in {multiscale.url} has no array at {url}; fix the metadata or the data") from None
        raise storage_error(url, e, storage.s3) from None
    if store.rank != 3:
        raise SourceError(f"{url} has {store.rank} dimensions; expected 3 (z, y, x)")
    if multiscale.driver == "n5":
        store = store.T  # N5 lists dimensions fastest-first (x, y, z); metadata axes are in C order
    if multiscale.axis_order != (0, 1, 2):
        store = store[ts.d[list(multiscale.axis_order)].transpose[:]]
    return LevelArray(multiscale, level, resampled, store)


# ----------------------------------------------------------------------------- catalog


@dataclass(frozen=True, order=True)
class LabelEntry:
    organelle: str
    crop: str  # 'crop<N>' for ground truth, INFERENCE_CROP for inference labels
    url: str

    @property
    def kind(self) -> str:
        return "inference" if self.crop == INFERENCE_CROP else "groundtruth"


@dataclass(frozen=True, order=True)
class DatasetEntry:
    name: str
    raw: str
    labels: tuple[LabelEntry, ...]


@dataclass(frozen=True)
class Catalog:
    """Raw and label arrays per dataset, sorted, so every machine sees the same list."""

    root: str | None
    datasets: tuple[DatasetEntry, ...]

    @classmethod
    def of(cls, root: str | None, datasets: Iterable[DatasetEntry]) -> "Catalog":
        merged: dict[str, DatasetEntry] = {}
        for d in datasets:
            if d.name in merged and merged[d.name].raw != d.raw:
                raise SourceError(f"catalog lists dataset {d.name} with two raw arrays ({merged[d.name].raw}, {d.raw})")
            labels = set(merged[d.name].labels if d.name in merged else ()) | set(d.labels)
            merged[d.name] = DatasetEntry(d.name, d.raw, tuple(sorted(labels)))
        return cls(root, tuple(merged[name] for name in sorted(merged)))

    def to_json(self) -> dict:
        def rel(url: str) -> str:
            prefix = (self.root or "").rstrip("/") + "/"
            return url[len(prefix):] if self.root and url.startswith(prefix) else url

        return {
            "format": CATALOG_FORMAT,
            "version": CATALOG_VERSION,
            "root": self.root,
            "datasets": [
                {"name": d.name, "raw": rel(d.raw), "labels": [{"organelle": l.organelle, "crop": l.crop, "url": rel(l.url)} for l in d.labels]}
                for d in self.datasets
            ],
        }

    def sha256(self) -> str:
        return hashlib.sha256(canonical_json(self.to_json()).encode()).hexdigest()

    def dataset_names(self) -> list[str]:
        return [d.name for d in self.datasets]

    def organelles(self) -> list[str]:
        return sorted({l.organelle for d in self.datasets for l in d.labels})


def catalog_from_json(document: Any, where: str, base: str | None) -> Catalog:
    if not isinstance(document, dict) or not isinstance(document.get("datasets"), list):
        raise SourceError(f"catalog {where} has no 'datasets' list; see README 'Data sources' for the format")
    root = document.get("root") or base

    def resolve(url: Any, what: str) -> str:
        if not isinstance(url, str) or not url:
            raise SourceError(f"catalog {where}: {what} is not a path or URL")
        if not is_absolute(url):
            if root is None:
                raise SourceError(f"catalog {where}: relative path {url!r} needs a 'root'")
            url = join_url(root, url)
        return url if "://" in url else os.path.normpath(url)

    datasets = []
    for d in document["datasets"]:
        if not isinstance(d, dict) or not isinstance(d.get("name"), str):
            raise SourceError(f"catalog {where}: a dataset entry without 'name'")
        labels = []
        for l in d.get("labels", []):
            if not isinstance(l, dict) or not isinstance(l.get("organelle"), str):
                raise SourceError(f"catalog {where}: dataset {d['name']} has a label entry without 'organelle'")
            crop = str(l.get("crop") or INFERENCE_CROP)
            labels.append(LabelEntry(l["organelle"], crop, resolve(l.get("url"), f"label {l['organelle']} of {d['name']}")))
        datasets.append(DatasetEntry(d["name"], resolve(d.get("raw"), f"raw of {d['name']}"), tuple(labels)))
    return Catalog.of(document.get("root"), datasets)


CSV_COLUMNS = ("dataset", "raw", "organelle", "labels")


def catalog_from_csv(text: str, where: str, base: str) -> Catalog:
    """Rows: dataset, raw, organelle, labels[, crop]; an empty crop means inference labels."""
    rows = list(csv.DictReader(io.StringIO(text)))
    header = set(rows[0]) if rows else set()
    missing = [c for c in CSV_COLUMNS if c not in header]
    if missing:
        raise SourceError(f"catalog {where} lacks column(s) {', '.join(missing)}; header must hold {', '.join(CSV_COLUMNS)}[, crop]")
    document = {"root": base, "datasets": []}
    for row in rows:
        label = {"organelle": row["organelle"].strip(), "crop": (row.get("crop") or "").strip(), "url": row["labels"].strip()}
        document["datasets"].append({"name": row["dataset"].strip(), "raw": row["raw"].strip(), "labels": [label]})
    catalog = catalog_from_json(document, where, base)
    return Catalog(None, catalog.datasets)


def load_catalog_file(path: str) -> Catalog:
    file = Path(path)
    try:
        text = file.read_text()
    except OSError as e:
        raise SourceError(f"cannot read --catalog {path} ({e.strerror}); check the path") from None
    base = str(file.resolve().parent)
    if file.suffix.lower() == ".csv":
        return catalog_from_csv(text, path, base)
    try:
        document = json.loads(text)
    except json.JSONDecodeError as e:
        raise SourceError(f"--catalog {path} is not valid JSON ({e}); give a JSON or .csv catalog") from None
    return catalog_from_json(document, path, base)


def scan_cellmap_root(root: str, storage: Storage) -> Catalog:
    """Find every dataset under root in the CellMap layout (listings only, no array reads)."""
    names = storage.list_dirs(root)
    if not names and not is_s3(root) and not Path(root).is_dir():
        raise SourceError(f"data root {root} does not exist; check --data-root / ${DATA_ROOT_ENV}")
    datasets = [d for d in (scan_dataset(root, name, storage) for name in names) if d is not None]
    if not datasets:
        raise SourceError(
            f"no CellMap datasets under {root} (expected ROOT/<dataset>/<dataset>.zarr/{RECON}/em/fibsem-uint8); "
            "check --data-root or give --catalog FILE"
        )
    return Catalog.of(root, datasets)


def scan_dataset(root: str, name: str, storage: Storage) -> DatasetEntry | None:
    entries = storage.list_dirs(join_url(root, name))
    for suffix in CONTAINER_SUFFIXES:
        if name + suffix not in entries:
            continue
        container = join_url(root, name, name + suffix)
        raw_names = [r for r in RAW_ARRAY_NAMES if r in storage.list_dirs(join_url(container, RECON, "em"))]
        if not raw_names:
            continue
        labels = []
        for crop in storage.list_dirs(join_url(container, GROUNDTRUTH_DIR)):
            for organelle in storage.list_dirs(join_url(container, GROUNDTRUTH_DIR, crop)):
                labels.append(LabelEntry(organelle, crop, join_url(container, GROUNDTRUTH_DIR, crop, organelle)))
        for organelle in storage.list_dirs(join_url(container, INFERENCE_DIR)):
            labels.append(LabelEntry(organelle, INFERENCE_CROP, join_url(container, INFERENCE_DIR, organelle)))
        return DatasetEntry(name, join_url(container, RECON, "em", raw_names[0]), tuple(sorted(labels)))
    return None


def normalise_root(root: str) -> str:
    return root.rstrip("/") if is_s3(root) else str(Path(root).expanduser().resolve())


def prepare_catalog(
    data_root: str | None,
    catalog_file: str | None,
    output_dir: str | Path | None,
    storage: Storage,
    refresh: bool = False,
) -> Catalog:
    """--catalog FILE as given; else the data root's catalog saved in the output directory,
    scanned and saved when missing, made for another root, or --refresh-catalog."""
    if catalog_file:
        return load_catalog_file(catalog_file)
    if not data_root:
        raise SourceError(
            f"the CellMap source needs --data-root ROOT (or ${DATA_ROOT_ENV}) or --catalog FILE; "
            "pass --source synthetic for the built-in demo data"
        )
    root = normalise_root(data_root)
    saved = Path(output_dir) / CATALOG_FILE_NAME if output_dir else None
    if saved is not None and saved.is_file() and not refresh:
        try:
            document = json.loads(saved.read_text())
        except (OSError, json.JSONDecodeError):
            document = None  # rewritten below
        if isinstance(document, dict) and document.get("root") == root and document.get("format") == CATALOG_FORMAT:
            return catalog_from_json(document, str(saved), root)
    catalog = scan_cellmap_root(root, storage)
    if saved is not None:
        save_catalog(catalog, saved)
    return catalog


def save_catalog(catalog: Catalog, path: Path) -> None:
    try:
        write_json_atomic(path, catalog.to_json())
    except OSError as e:
        log.warning("could not save the catalog to %s (%s); every job will rescan the data root", path, e.strerror)


# ----------------------------------------------------------------------------- crop units


@dataclass(frozen=True)
class CropUnit:
    """One place a crop can come from: a dataset's ground-truth crop or its inference labels."""

    dataset: str
    crop: str
    raw: str
    labels: tuple[tuple[str, str], ...]  # (organelle, group URL) in --organelles order

    @property
    def kind(self) -> str:
        return "inference" if self.crop == INFERENCE_CROP else "groundtruth"


def crop_name(text: str) -> str:
    return text if text.startswith("crop") or text == INFERENCE_CROP else f"crop{text}"


def eligible_units(catalog: Catalog, options: SamplingOptions) -> list[CropUnit]:
    """Every (dataset, crop) holding all requested organelles, after the crop and inference
    filters, in a fixed order. Raises SourceError naming what is missing."""
    known = set(catalog.dataset_names())
    unknown = [d for d in options.inference_filter if d not in known]
    if unknown:
        raise SourceError(
            f"dataset(s) {', '.join(unknown)} named by --inference-filter are not in the catalog "
            f"(known: {', '.join(sorted(known)[:20])}); check the names"
        )
    absent = [o for o in options.organelles if o not in catalog.organelles()]
    if absent:
        raise SourceError(
            f"organelle(s) {', '.join(absent)} appear in no dataset of the catalog "
            f"(known: {', '.join(catalog.organelles()[:40]) or 'none'}); check --organelles"
        )
    crops = {crop_name(c) for c in options.crop_filter}
    unknown_crops = sorted(crops - {l.crop for d in catalog.datasets for l in d.labels})
    if unknown_crops:
        raise SourceError(f"crop(s) {', '.join(unknown_crops)} named by --crop-filter are in no dataset of the catalog; check the names")
    units = []
    for d in catalog.datasets:
        use_inference = d.name in options.inference_filter
        by_crop: dict[str, dict[str, str]] = {}
        for l in d.labels:
            if (l.kind == "inference") == use_inference and (use_inference or not crops or l.crop in crops):
                by_crop.setdefault(l.crop, {})[l.organelle] = l.url
        for crop, arrays in sorted(by_crop.items()):
            if all(o in arrays for o in options.organelles):
                units.append(CropUnit(d.name, crop, d.raw, tuple((o, arrays[o]) for o in options.organelles)))
    without = [d for d in options.inference_filter if not any(u.dataset == d for u in units)]
    if without:
        raise SourceError(
            f"dataset(s) {', '.join(without)} named by --inference-filter have no inference labels for all of "
            f"{', '.join(options.organelles)}; check --organelles or drop them from --inference-filter"
        )
    if not units:
        raise SourceError(
            f"no dataset has {'inference labels' if options.inference_filter else 'a ground-truth crop'} holding all of "
            f"{', '.join(options.organelles)}"
            + (f" among crops {', '.join(sorted(crops))}" if crops else "")
            + "; check --organelles, --crop-filter and --inference-filter"
        )
    return units


# ----------------------------------------------------------------------------- reading and resampling


@dataclass
class ResolvedUnit:
    unit: CropUnit
    raw: LevelArray
    labels: dict[str, LevelArray]

    @property
    def box(self) -> tuple[np.ndarray, np.ndarray]:
        """The annotated box: where every requested label array has voxels."""
        lo = np.max([a.lo for a in self.labels.values()], axis=0)
        hi = np.min([a.hi for a in self.labels.values()], axis=0)
        return lo, hi


def window_start(resolved: ResolvedUnit, geometry: CropGeometry, gt_extension: bool, rng: np.random.Generator) -> np.ndarray | None:
    """World corner of a window on the base-resolution grid from the raw level's corner,
    inside the raw array and overlapping (or, without GT extension, inside) the box.
    None where no such window exists for this unit."""
    step, extent = geometry.base_resolution, geometry.extent_nm
    grid = resolved.raw.lo
    box_lo, box_hi = resolved.box
    start = np.empty(3)
    for axis in range(3):
        g = grid[axis]
        k_lo = math.ceil((resolved.raw.lo[axis] - g) / step - TOLERANCE)
        k_hi = math.floor((resolved.raw.hi[axis] - extent - g) / step + TOLERANCE)
        if not gt_extension:
            k_lo = max(k_lo, math.ceil((box_lo[axis] - g) / step - TOLERANCE))
            k_hi = min(k_hi, math.floor((box_hi[axis] - extent - g) / step + TOLERANCE))
        if k_lo > k_hi:
            return None
        if gt_extension:  # the window's centre falls in the box, then the window is kept inside the raw
            c_lo = math.floor((box_lo[axis] - extent / 2 - g) / step)
            c_hi = math.ceil((box_hi[axis] - extent / 2 - g) / step)
            k = min(max(int(rng.integers(c_lo, c_hi + 1)), k_lo), k_hi)
        else:
            k = int(rng.integers(k_lo, k_hi + 1))
        start[axis] = g + k * step
    return start


def regular_step(edges: np.ndarray) -> int | None:
    """The whole number of input voxels per output voxel, if the edges fall on voxel borders."""
    rounded = np.round(edges)
    if not np.all(np.abs(edges - rounded) < TOLERANCE):
        return None
    steps = np.diff(rounded).astype(int)
    return int(steps[0]) if steps[0] > 0 and np.all(steps == steps[0]) else None


def area_mean_axis(block: np.ndarray, axis: int, edges: np.ndarray) -> np.ndarray:
    """Mean of a piecewise-constant signal over [edges[j], edges[j+1]) along axis
    (edges in input-voxel units from the block's start): exact area weights."""
    n_in = block.shape[axis]
    step = regular_step(edges)
    if step is not None:  # whole input voxels per output voxel: a slice or a block mean
        span = [slice(None)] * block.ndim
        span[axis] = slice(int(round(edges[0])), int(round(edges[-1])))
        taken = block[tuple(span)]
        if step == 1:
            return taken
        shape = list(taken.shape)
        shape[axis : axis + 1] = [len(edges) - 1, step]
        return taken.reshape(shape).mean(axis=axis + 1, dtype=np.float32)
    values = np.moveaxis(block, axis, 0).astype(np.float32)
    cumulative = np.concatenate([np.zeros((1, *values.shape[1:]), np.float32), np.cumsum(values, axis=0, dtype=np.float32)])
    e = np.clip(edges, 0, n_in)
    whole = np.minimum(np.floor(e).astype(int), n_in - 1)
    frac = (e - whole).astype(np.float32).reshape(-1, *([1] * (values.ndim - 1)))
    integral = cumulative[whole] + frac * values[whole]
    out = (integral[1:] - integral[:-1]) / np.diff(e).astype(np.float32).reshape(-1, *([1] * (values.ndim - 1)))
    return np.moveaxis(out, 0, axis)


def read_raw(array: LevelArray, start_nm: np.ndarray, target_nm: float, n: int) -> np.ndarray:
    """n^3 raw voxels of target_nm from start_nm: a direct read where the level matches,
    an area mean of the finer level otherwise (rounded back to integer dtypes)."""
    scale = np.asarray(array.level.scale)
    edges = [(start_nm[a] + np.arange(n + 1) * target_nm - array.lo[a]) / scale[a] for a in range(3)]
    first = [max(0, int(math.floor(e[0] + TOLERANCE))) for e in edges]
    last = [min(int(array.shape[a]), int(math.ceil(e[-1] - TOLERANCE))) for a, e in enumerate(edges)]
    nbytes = int(np.prod([l - f for f, l in zip(first, last)])) * array.store.dtype.numpy_dtype.itemsize
    if nbytes > MAX_RAW_READ_BYTES:
        raise SourceError(
            f"raw level {array.url} ({format_voxel(array.level.scale)} nm) is much finer than {target_nm:g} nm: one crop would read "
            f"{nbytes / 2**30:.1f} GiB; add coarser levels to the pyramid or raise --min-resolution-for-raw"
        )
    block = array.store[tuple(slice(f, l) for f, l in zip(first, last))].read().result()
    # whole-voxel axes first: they shrink the block before any fractional axis needs float copies
    for axis in sorted(range(3), key=lambda a: regular_step(edges[a] - first[a]) is None):
        block = area_mean_axis(block, axis, edges[axis] - first[axis])
    dtype = array.store.dtype.numpy_dtype
    if block.dtype != dtype:
        if np.issubdtype(dtype, np.integer):
            info = np.iinfo(dtype)
            block = np.clip(np.rint(block), info.min, info.max)
        block = block.astype(dtype)
    return np.ascontiguousarray(block)


def read_labels(array: LevelArray, start_nm: np.ndarray, target_nm: float, n: int) -> tuple[np.ndarray, np.ndarray]:
    """n^3 labels of target_nm from start_nm, each the level voxel holding its centre,
    and a mask of the voxels whose centre lies inside the array (0 labels elsewhere)."""
    scale = np.asarray(array.level.scale)
    index, valid = [], []
    for a in range(3):
        centres = start_nm[a] + (np.arange(n) + 0.5) * target_nm
        i = np.floor((centres - array.lo[a]) / scale[a] + TOLERANCE).astype(np.int64)
        index.append(i)
        valid.append((i >= 0) & (i < array.shape[a]))
    mask = valid[0][:, None, None] & valid[1][None, :, None] & valid[2][None, None, :]
    if not all(v.any() for v in valid):
        return np.zeros((n, n, n), array.store.dtype.numpy_dtype), mask
    inside = [i[v] for i, v in zip(index, valid)]
    if all(np.array_equal(i, np.arange(i[0], i[0] + len(i))) for i in inside):
        values = array.store[tuple(slice(int(i[0]), int(i[-1]) + 1) for i in inside)].read().result()
    else:
        values = array.store.oindex[tuple(inside)].read().result()
    if all(v.all() for v in valid):
        return values, mask
    labels = np.zeros((n, n, n), values.dtype)
    labels[np.ix_(*valid)] = values
    return labels, mask


def instance_dtype(dtype: np.dtype) -> np.dtype:
    """Instance ids keep their values: uint32 for ids of up to 32 bits, uint64 beyond."""
    return np.dtype(np.uint32) if np.dtype(dtype).itemsize <= 4 else np.dtype(np.uint64)


def as_instance_ids(labels: np.ndarray, url: str) -> np.ndarray:
    if np.issubdtype(labels.dtype, np.signedinteger) and labels.size and labels.min() < 0:
        raise SourceError(f"labels at {url} hold negative ids ({labels.min()}); ids must be >= 0")
    if not np.issubdtype(labels.dtype, np.integer):
        raise SourceError(f"labels at {url} are {labels.dtype}, not integers; point the organelle at a label array")
    return labels.astype(instance_dtype(labels.dtype), copy=False)


def raw_intensity_range(dtype: np.dtype) -> tuple[float, float]:
    """Integer raw maps its full range to [0, 1]; float raw is taken as already in [0, 1]."""
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return float(info.min), float(info.max)
    return 0.0, 1.0


# ----------------------------------------------------------------------------- augmentation


def draw_augmentation(volume_index: int) -> dict:
    """Flips, an axis order (together every 90-degree rotation and axis swap of the cube)
    and an intensity change, from the index's own generator stream."""
    rng = np.random.default_rng([volume_index, AUGMENT_STREAM])
    return {
        "axis_order": [int(a) for a in rng.permutation(3)],
        "flip": [bool(f) for f in rng.integers(0, 2, 3)],
        "contrast": round(float(rng.uniform(0.8, 1.2)), 6),
        "brightness": round(float(rng.uniform(-0.1, 0.1)), 6),
        "gamma": round(float(np.exp(rng.uniform(np.log(0.8), np.log(1.25)))), 6),
        "order": "transpose to axis_order, then flip, then intensity: ((x - 0.5) * contrast + 0.5 + brightness) ** gamma on [0, 1]",
    }


def transform_geometry(array: np.ndarray | None, params: dict) -> np.ndarray | None:
    if array is None:
        return None
    out = np.transpose(array, params["axis_order"])
    flipped = [a for a, f in enumerate(params["flip"]) if f]
    return np.ascontiguousarray(np.flip(out, flipped) if flipped else out)


def transform_intensity(raw: np.ndarray, raw_range: tuple[float, float], params: dict) -> np.ndarray:
    """The same monotone map for every voxel; it never looks at the labels."""
    lo, hi = raw_range

    def curve(x: np.ndarray) -> np.ndarray:
        unit = np.clip((x.astype(np.float64) - lo) / (hi - lo), 0, 1)
        unit = np.clip((unit - 0.5) * params["contrast"] + 0.5 + params["brightness"], 0, 1) ** params["gamma"]
        return unit * (hi - lo) + lo

    if raw.dtype in (np.uint8, np.uint16):  # a lookup table: one pass over the voxels
        table = np.rint(curve(np.arange(np.iinfo(raw.dtype).max + 1))).astype(raw.dtype)
        return table[raw]
    return curve(raw).astype(raw.dtype)


def augment_crop(crop: SourceCrop, volume_index: int) -> SourceCrop:
    params = draw_augmentation(volume_index)
    crop.raw = transform_intensity(transform_geometry(crop.raw, params), crop.raw_range, params)
    crop.gt = transform_geometry(crop.gt, params)
    crop.mask = transform_geometry(crop.mask, params)
    crop.description["augmentation"] = params
    return crop


# ----------------------------------------------------------------------------- the source


class CellMapSource(VolumeSource):
    """Crops from a catalog of CellMap-layout (or catalogued) multiscale arrays."""

    name = "cellmap"

    def __init__(self, catalog: Catalog, storage: Storage | None = None, augment: bool = False):
        self.catalog = catalog
        self.storage = storage or Storage()
        self.augment = augment
        self._multiscales: dict[str, Multiscale] = {}

    def fingerprint_values(self) -> dict:
        return {"source": self.name, "root": self.catalog.root, "catalog_sha256": self.catalog.sha256(), "augment": self.augment}

    def sample(self, volume_index: int, geometry: CropGeometry, options: SamplingOptions) -> SourceCrop:
        units = eligible_units(self.catalog, options)
        remaining = list(range(len(units)))
        resolved: dict[int, ResolvedUnit] = {}

        def draw(rng: np.random.Generator) -> SourceCrop:
            while remaining:
                position = int(rng.integers(len(remaining)))
                index = remaining[position]
                unit = resolved.get(index) or resolved.setdefault(index, self.resolve(units[index], geometry))
                start = window_start(unit, geometry, options.gt_extension, rng)
                if start is not None:
                    return self.read_crop(unit, index, start, geometry, options)
                remaining.pop(position)  # this crop cannot hold the window: never draw it again
            raise SourceError(
                f"no candidate crop can hold a {geometry.extent_nm:g} nm window inside its raw array"
                + ("" if options.gt_extension else " and annotated box (--no-gt-extension)")
                + f" among {len(units)} crop(s); lower --output-image-dim or --base-resolution"
                + ("" if options.gt_extension else ", or allow GT extension")
            )

        crop = draw_passing_crop(volume_index, options, draw)
        if self.augment:
            crop = augment_crop(crop, volume_index)
        else:
            crop.description["augmentation"] = None
        return crop

    def multiscale(self, url: str) -> Multiscale:
        if url not in self._multiscales:
            self._multiscales[url] = read_multiscale(url, self.storage)
        return self._multiscales[url]

    def resolve(self, unit: CropUnit, geometry: CropGeometry) -> ResolvedUnit:
        raw = open_level(self.multiscale(unit.raw), geometry.min_resolution_for_raw, "raw", "--min-resolution-for-raw", self.storage)
        labels = {
            organelle: open_level(self.multiscale(url), geometry.base_resolution, f"{organelle} labels", "--base-resolution", self.storage)
            for organelle, url in unit.labels
        }
        return ResolvedUnit(unit, raw, labels)

    def read_crop(self, resolved: ResolvedUnit, index: int, start: np.ndarray, geometry: CropGeometry, options: SamplingOptions) -> SourceCrop:
        unit = resolved.unit
        n = geometry.output_image_dim
        raw = read_raw(resolved.raw, start, geometry.min_resolution_for_raw, geometry.slice_size)
        per_organelle, mask = {}, np.ones((n, n, n), bool)
        for organelle, array in resolved.labels.items():
            labels, valid = read_labels(array, start, geometry.base_resolution, n)
            per_organelle[organelle] = as_instance_ids(labels, array.url)
            mask &= valid
        gt = combine_organelle_labels(per_organelle, options.organelles)
        if not mask.all():
            gt = np.where(mask, gt, 0).astype(gt.dtype)
        box_lo, box_hi = resolved.box
        return SourceCrop(
            raw=raw,
            gt=gt,
            mask=mask.astype(np.uint8) if options.gt_extension else None,
            raw_range=raw_intensity_range(raw.dtype),
            offset_nm=tuple(float(v) for v in start),
            description={
                "index": index,
                "name": unit.dataset,
                "dataset": unit.dataset,
                "crop": unit.crop,
                "label_kind": unit.kind,
                "paths": {"raw": resolved.raw.url} | {o: a.url for o, a in resolved.labels.items()},
                "levels": {"raw": resolved.raw.describe()} | {o: a.describe() for o, a in resolved.labels.items()},
                "voxel_size_nm": {"raw": [geometry.min_resolution_for_raw] * 3, "labels": [geometry.base_resolution] * 3},
                "offset_nm": [float(v) for v in start],
                "extent_nm": [geometry.extent_nm] * 3,
                "annotated_box_nm": {"offset": box_lo.tolist(), "extent": (box_hi - box_lo).tolist()},
                "label_rule": "instance ids" if len(options.organelles) == 1 else "classes 1..n in --organelles order, later organelle wins overlaps",
                "resampling": {"raw": "area mean", "labels": "nearest (voxel holding the centre)"},
                "catalog_root": self.catalog.root,
                "catalog_sha256": self.catalog.sha256(),
            },
        )


def source_from_args(args: Any) -> CellMapSource:
    """The CellMap source that preprocess_volume.py options ask for."""
    storage = Storage(S3Options(endpoint=getattr(args, "s3_endpoint", None)), getattr(args, "num_threads", 8))
    catalog = prepare_catalog(
        getattr(args, "data_root", None) or os.environ.get(DATA_ROOT_ENV),
        getattr(args, "catalog", None),
        getattr(args, "output_dir", None),
        storage,
        refresh=getattr(args, "refresh_catalog", False),
    )
    return CellMapSource(catalog, storage, augment=getattr(args, "augment", False))


def main(argv: list[str] | None = None) -> int:
    """Build (or refresh) the catalog of a data root once and save it in the output directory."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--data-root", default=None, help=f"directory or s3://bucket/prefix (default ${DATA_ROOT_ENV})")
    parser.add_argument("--output-dir", required=True, help=f"where {CATALOG_FILE_NAME} is written")
    parser.add_argument("--s3-endpoint", default=None)
    args = parser.parse_args(argv)
    args.refresh_catalog = True
    try:
        source = source_from_args(args)
    except SourceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    catalog = source.catalog
    n_crops = sum(len({l.crop for l in d.labels}) for d in catalog.datasets)
    print(
        f"catalog of {catalog.root}: {len(catalog.datasets)} dataset(s), {n_crops} label set(s), "
        f"organelles {', '.join(catalog.organelles())}; saved to {Path(args.output_dir) / CATALOG_FILE_NAME}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
