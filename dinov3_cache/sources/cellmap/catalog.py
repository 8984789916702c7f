"""The catalog: which raw and label arrays each dataset holds, found once by scanning a
CellMap-layout data root (or given as a JSON or CSV file) and saved for every job to read."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dinov3_cache.records import canonical_json, write_json_atomic
from dinov3_cache.sources.base import SourceError
from dinov3_cache.sources.cellmap.store import Storage, is_absolute, is_s3, join_url

log = logging.getLogger(__name__)

DATA_ROOT_ENV = "DINOV3_DATA_ROOT"  # the data root when --data-root is not given
CATALOG_FILE_NAME = "cellmap_catalog.json"
CATALOG_FORMAT = "dinov3-cellmap-catalog"
CATALOG_VERSION = 1
CONTAINER_SUFFIXES = (".zarr", ".n5")
RECON = "recon-1"
RAW_ARRAY_NAMES = ("fibsem-uint8", "fibsem-uint16")  # first found is used
GROUNDTRUTH_DIR = f"{RECON}/labels/groundtruth"
INFERENCE_DIR = f"{RECON}/labels/inference/segmentations"
INFERENCE_CROP = "inference"  # the crop name of a dataset's inference labels


def label_kind(crop: str) -> str:
    return "inference" if crop == INFERENCE_CROP else "groundtruth"


@dataclass(frozen=True, order=True)
class LabelEntry:
    organelle: str
    crop: str  # 'crop<N>' for ground truth, INFERENCE_CROP for inference labels
    url: str

    @property
    def kind(self) -> str:
        return label_kind(self.crop)


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
    def of(cls, root: str | None, datasets: Iterable[DatasetEntry]) -> Catalog:
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
                {"name": d.name, "raw": rel(d.raw), "labels": [{"organelle": entry.organelle, "crop": entry.crop, "url": rel(entry.url)} for entry in d.labels]}
                for d in self.datasets
            ],
        }

    def sha256(self) -> str:
        return hashlib.sha256(canonical_json(self.to_json()).encode()).hexdigest()

    def dataset_names(self) -> list[str]:
        return [d.name for d in self.datasets]

    def organelles(self) -> list[str]:
        return sorted({entry.organelle for d in self.datasets for entry in d.labels})


def catalog_from_json(document: Any, where: str, base: str | None) -> Catalog:
    if not isinstance(document, dict) or not isinstance(document.get("datasets"), list):
        raise SourceError(f"catalog {where} has no 'datasets' list; see docs/sources.md, section 'Catalog', for the format")
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
        for entry in d.get("labels", []):
            if not isinstance(entry, dict) or not isinstance(entry.get("organelle"), str):
                raise SourceError(f"catalog {where}: dataset {d['name']} has a label entry without 'organelle'")
            crop = str(entry.get("crop") or INFERENCE_CROP)
            labels.append(LabelEntry(entry["organelle"], crop, resolve(entry.get("url"), f"label {entry['organelle']} of {d['name']}")))
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
