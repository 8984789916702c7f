"""The CellMap source: crops drawn from a catalog's crop units, read and resampled at the
requested geometry, optionally augmented; its command-line options, how option values build
it, and its checks before jobs start."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from dinov3_cache.geometry import AxisTransform, CropGeometry
from dinov3_cache.sources.base import (
    SamplingOptions,
    SourceCrop,
    SourceError,
    SourceOption,
    VolumeSource,
    combine_organelle_labels,
    draw_passing_crop,
)
from dinov3_cache.sources.cellmap.augment import augment_crop
from dinov3_cache.sources.cellmap.catalog import CATALOG_FILE_NAME, DATA_ROOT_ENV, Catalog, prepare_catalog
from dinov3_cache.sources.cellmap.crops import CropUnit, ResolvedUnit, eligible_units, window_start
from dinov3_cache.sources.cellmap.encoding import read_encoding
from dinov3_cache.sources.cellmap.ome_ngff import Multiscale, open_level, read_multiscale
from dinov3_cache.sources.cellmap.reading import as_instance_ids, raw_intensity_range, read_labels, read_raw
from dinov3_cache.sources.cellmap.signing import Snapshot, check_array, rebased, sign_reads
from dinov3_cache.sources.cellmap.store import S3Options, Storage
from dinov3_cache.sources.signatures import SIGNATURE_FORMAT, UNREACHABLE, SourceStatus, combine, field_of
from dinov3_cache.switch import Switch

# the CellMap source's options; all but --refresh-catalog travel to every job
CELLMAP_OPTIONS = (
    SourceOption(
        "--data-root", {"default": None, "help": f"CellMap-layout data: a directory or s3://bucket/prefix (default ${DATA_ROOT_ENV})"},
        locates_data=True,
    ),
    SourceOption(
        "--catalog", {"default": None, "help": "JSON or CSV file listing raw and label arrays per dataset"}, locates_data=True,
    ),
    SourceOption(
        "--s3-endpoint",
        {"default": None,
         "help": "endpoint URL of an S3-compatible store (default AWS); credentials from AWS_* variables, else anonymous"},
        locates_data=True,
    ),
    SourceOption(
        "--augment",
        {"action": Switch, "help": "flips, axis swaps and intensity changes seeded by the volume index, recorded in metadata"},
    ),
    SourceOption(
        "--refresh-catalog",
        {"action": "store_true", "help": f"rescan --data-root and rewrite OUTPUT_DIR/{CATALOG_FILE_NAME} before sampling"},
        pass_through=False,
    ),
)


class CellMapSource(VolumeSource):
    """Crops from a catalog of CellMap-layout (or catalogued) multiscale arrays."""

    name = "cellmap"
    summary = "implied by --data-root / --catalog"
    choice_hint = f"--data-root ROOT (or set {DATA_ROOT_ENV}) or --catalog FILE for CellMap data"
    options = CELLMAP_OPTIONS
    writes_when_built = True  # the data root's catalog, saved in the output directory

    def __init__(self, catalog: Catalog, storage: Storage | None = None, augment: bool = False):
        self.catalog = catalog
        self.storage = storage or Storage()
        self.augment = augment
        self._multiscales: dict[str, Multiscale] = {}
        # the metadata documents (and S3 listings) read for signing or checking, shared by every volume of this process
        self.snapshot = Snapshot(self.storage)

    @classmethod
    def implied_by(cls, settings: Mapping[str, Any]) -> bool:
        """A data root (option or environment) or a catalog file means CellMap data."""
        return bool(settings.get("data_root") or settings.get("catalog") or os.environ.get(DATA_ROOT_ENV))

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> CellMapSource:
        """The catalog of --catalog, else of the data root (read from, or scanned and saved in,
        the output directory), read through --s3-endpoint."""
        storage = Storage(S3Options(endpoint=settings.get("s3_endpoint")), settings.get("num_threads", 8))
        catalog = prepare_catalog(
            settings.get("data_root") or os.environ.get(DATA_ROOT_ENV),
            settings.get("catalog"),
            settings.get("output_dir"),
            storage,
            refresh=settings.get("refresh_catalog", False),
        )
        return cls(catalog, storage, augment=settings.get("augment", False))

    @classmethod
    def viewer_layers(cls, record: Mapping[str, Any], settings: Mapping[str, Any]) -> tuple[list, Any]:
        from dinov3_cache.sources.cellmap.viewer_layers import cellmap_viewer_layers

        return cellmap_viewer_layers(record, settings)

    def preflight(self, options: SamplingOptions, geometry: CropGeometry) -> None:
        """The organelles and filters select at least one crop of the catalog."""
        eligible_units(self.catalog, options)

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
        crop.description["signature"], crop.signing = crop.signing(), None  # the reads it holds are freed
        if self.augment:
            return augment_crop(crop, volume_index)
        crop.description["augmentation"] = None
        crop.record_world_transform(AxisTransform())
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
        encodings = {
            organelle: read_encoding(array.multiscale.url, array.url, array.multiscale.driver, self.storage)
            for organelle, array in labels.items()
        }
        return ResolvedUnit(unit, raw, labels, encodings)

    def read_crop(self, resolved: ResolvedUnit, index: int, start: np.ndarray, geometry: CropGeometry, options: SamplingOptions) -> SourceCrop:
        unit = resolved.unit
        n = geometry.output_image_dim
        reads = {role: [] for role in ("raw", *resolved.labels)}
        raw = read_raw(resolved.raw, start, geometry.min_resolution_for_raw, geometry.slice_size, reads["raw"])
        per_organelle, mask, known = {}, np.ones((n, n, n), bool), np.ones((n, n, n), bool)
        for organelle, array in resolved.labels.items():
            labels, valid = read_labels(array, start, geometry.base_resolution, n, reads[organelle])
            encoding = resolved.encodings[organelle]
            if encoding is not None:
                labels, known_here = encoding.decode(labels)
                known &= known_here | ~valid  # outside the array the read gave zeros, not values
            per_organelle[organelle] = as_instance_ids(labels, array.url)
            mask &= valid
        mask &= known  # an 'unknown' voxel in any organelle leaves the class unknown there
        gt = combine_organelle_labels(per_organelle, options.organelles)
        if not mask.all():
            gt = np.where(mask, gt, 0).astype(gt.dtype)
        box_lo, box_hi = resolved.box
        return SourceCrop(
            raw=raw,
            gt=gt,
            # without GT extension every voxel is annotated, so a mask is needed only for unknown ones
            mask=mask.astype(np.uint8) if options.gt_extension or not known.all() else None,
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
                "annotation_encodings": {o: e.to_record() if e else None for o, e in resolved.encodings.items()},
                "unknown_voxels": int((~known).sum()),
                "catalog_root": self.catalog.root,
                "catalog_sha256": self.catalog.sha256(),
            },
            geometry=geometry,
            signing=lambda: {
                "format": SIGNATURE_FORMAT, "source": self.name,
                "arrays": sign_reads({"raw": resolved.raw, **resolved.labels}, {r: p[0] if p else None for r, p in reads.items()}, self.snapshot),
            },
        )

    def check_signature(self, signature: dict, description: dict) -> SourceStatus:
        """Each array the volume read, under the data root given now (its URLs moved there from
        the recorded catalog root), against the catalog and then the data (signing.check_array)."""
        arrays = field_of(signature, "arrays", dict, "source_dataset.signature")
        recorded_root = description.get("catalog_root")
        listed = {url for d in self.catalog.datasets for url in (d.raw, *(entry.url for entry in d.labels))}

        def move(url: str) -> str:
            return rebased(url, recorded_root, self.catalog.root)

        statuses = []
        for role, record in arrays.items():
            where = f"source_dataset.signature.arrays.{role}"
            group = move(field_of(record, "group", str, where))
            if group not in listed:
                statuses.append(SourceStatus(UNREACHABLE, f"{role}: {group} is not in the catalog of {self.catalog.root or 'the --catalog file'}", not_located=True))
                continue
            statuses.append(check_array(role, record, self.snapshot, move, where))
        return combine(statuses)

    @classmethod
    def for_checking(cls, settings: Mapping[str, Any]) -> CellMapSource:
        """The data root or catalog given now (scanned afresh: the cache's saved catalog is not rewritten)."""
        if not cls.implied_by(settings):
            raise SourceError(
                f"volumes read from CellMap data are checked against it: pass --data-root ROOT (or set {DATA_ROOT_ENV}) "
                "or --catalog FILE, and --s3-endpoint for an S3-compatible store, as given to the extraction"
            )
        return cls.from_settings({**settings, "output_dir": None, "refresh_catalog": False})


def source_from_args(args: Any) -> CellMapSource:
    """The CellMap source of parsed options (a Namespace): CellMapSource.from_settings."""
    return CellMapSource.from_settings(vars(args))
