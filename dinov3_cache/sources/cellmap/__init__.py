"""Training crops from CellMap-layout data: OME-NGFF multiscale zarr (or N5), local or on S3.

Layout under a data root (a directory or ``s3://bucket/prefix``)::

    ROOT/<dataset>/<dataset>.zarr/recon-1/em/fibsem-uint8                       raw, multiscale
    ROOT/<dataset>/<dataset>.zarr/recon-1/labels/groundtruth/crop<N>/<organelle>  annotated crops
    ROOT/<dataset>/<dataset>.zarr/recon-1/labels/inference/segmentations/<organelle>

(``<dataset>.n5`` containers are read the same way.) The datasets found are listed once
in a catalog (``cellmap_catalog.json`` in the output directory) that every job reads;
``--catalog FILE`` gives one by hand for data in another layout.

Geometry is in world units (nm), taken from each group's multiscale metadata, never from
level names (``ome_ngff``). For each array the level
whose voxel size matches the target is read; where none matches, the coarsest level that
is finer on every axis is read and resampled (area mean for raw, nearest voxel centre for
labels); both choices are recorded in ``source_dataset``.

A crop window (``output_image_dim * base_resolution`` nm per axis) starts on the grid of
``base_resolution`` steps from the raw level's first voxel corner, lies inside the raw
array, and overlaps the annotated box (GT extension) or lies inside it
(``--no-gt-extension``). Labels are valid inside every requested label array's extent.

Modules: ``store`` (local and S3 access), ``ome_ngff`` (levels and their world placement),
``catalog`` (what each dataset holds), ``crops`` (crop units and window placement),
``reading`` (resampled reads), ``augment``, ``signing`` (what a crop read, and re-checking it
against the data now), ``source`` (CellMapSource: its options, how option values build it, its
preflight check);
``python -m dinov3_cache.sources.cellmap`` builds a data root's catalog.
"""

from dinov3_cache.sources.cellmap.augment import (
    augment_crop,
    axis_transform,
    draw_augmentation,
    transform_geometry,
    transform_intensity,
)
from dinov3_cache.sources.cellmap.catalog import (
    CATALOG_FILE_NAME,
    Catalog,
    DatasetEntry,
    LabelEntry,
    catalog_from_csv,
    catalog_from_json,
    load_catalog_file,
    prepare_catalog,
    scan_cellmap_root,
)
from dinov3_cache.sources.cellmap.crops import CropUnit, eligible_units, window_start
from dinov3_cache.sources.cellmap.ome_ngff import Level, LevelArray, Multiscale, choose_level, parse_multiscale, read_multiscale
from dinov3_cache.sources.cellmap.reading import read_labels, read_raw
from dinov3_cache.sources.cellmap.source import CELLMAP_OPTIONS, CellMapSource, source_from_args
from dinov3_cache.sources.cellmap.store import S3Options, Storage

__all__ = [
    "CATALOG_FILE_NAME", "CELLMAP_OPTIONS", "Catalog", "CellMapSource", "CropUnit", "DatasetEntry", "LabelEntry", "Level", "LevelArray",
    "Multiscale", "S3Options", "Storage", "augment_crop", "axis_transform", "catalog_from_csv",
    "catalog_from_json", "choose_level", "draw_augmentation", "eligible_units", "load_catalog_file", "parse_multiscale",
    "prepare_catalog", "read_labels", "read_multiscale", "read_raw", "scan_cellmap_root", "source_from_args",
    "transform_geometry", "transform_intensity", "window_start",
]
