"""The CellMap source on small CellMap-layout datasets: geometry, determinism, filters,
labels, augmentation, S3 through a real moto_server, and the CLI's bad-input lines."""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import cellmap_data as data
import numpy as np
import pytest
from conftest import TINY_GEOMETRY_ARGS, free_port, run_script, s3_server_holding

from dinov3_cache.paths import VolumePaths
from dinov3_cache.records import read_json
from dinov3_cache.sources.base import CropGeometry, LabelFilters, SamplingOptions, SourceError
from dinov3_cache.sources.cellmap import (
    CATALOG_FILE_NAME,
    Catalog,
    CellMapSource,
    S3Options,
    Storage,
    catalog_from_json,
    draw_augmentation,
    eligible_units,
    load_catalog_file,
    parse_multiscale,
    prepare_catalog,
    transform_geometry,
    transform_intensity,
)
from dinov3_cache.sources.cellmap.encoding import AnnotationEncoding, parse_encoding
from dinov3_cache.zarr_arrays import open_array

GEOMETRY = CropGeometry(128.0, 32.0, 16)  # window 2048 nm, raw 64^3, labels 16^3
N = GEOMETRY.output_image_dim
S = GEOMETRY.slice_size
NO_FILTERS = LabelFilters(0.0, 0, 0.0)
INDICES = range(6)


@pytest.fixture(scope="session")
def cellmap_root(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("cellmap") / "data"
    return root, {"jrc_alpha": data.build_alpha(root), "jrc_beta": data.build_beta(root), "jrc_gamma": data.build_gamma(root)}


@pytest.fixture(scope="session")
def catalog(cellmap_root, tmp_path_factory) -> Catalog:
    return prepare_catalog(str(cellmap_root[0]), None, tmp_path_factory.mktemp("out"), Storage())


def sample(catalog: Catalog, index: int, organelles=("mito",), storage=None, augment=False, **options):
    options.setdefault("filters", NO_FILTERS)
    source = CellMapSource(catalog, storage or Storage(), augment=augment)
    return source.sample(index, GEOMETRY, SamplingOptions(organelles=tuple(organelles), **options))


def only(catalog: Catalog, *names: str) -> Catalog:
    return Catalog(catalog.root, tuple(d for d in catalog.datasets if d.name in names))


# ----------------------------------------------------------------------------- references
# Written from the definitions (voxel i of a level covers corner + [i, i+1) * scale),
# independently of the code under test.


def voxel_index(offset: float, corner: float, scale: float, j: int, target: float) -> int:
    return int(np.floor((offset + (j + 0.5) * target - corner) / scale))


def reference_labels(array: np.ndarray, corner, scale, offset, n=N, target=128.0):
    """Labels and mask from the stored values; 'unknown' voxels (data.UNKNOWN) are 0 and masked."""
    labels = np.zeros((n, n, n), array.dtype)
    mask = np.zeros((n, n, n), bool)
    idx = [[voxel_index(offset[a], corner[a], scale[a], j, target) for j in range(n)] for a in range(3)]
    for z in range(n):
        for y in range(n):
            for x in range(n):
                i = (idx[0][z], idx[1][y], idx[2][x])
                if all(0 <= i[a] < array.shape[a] for a in range(3)) and array[i] != data.UNKNOWN:
                    labels[z, y, x] = array[i]
                    mask[z, y, x] = True
    return labels, mask


def overlap_weights(offset: float, target: float, n: int, corner: float, scale: float, n_in: int) -> np.ndarray:
    w = np.zeros((n, n_in))
    for j in range(n):
        lo, hi = offset + j * target, offset + (j + 1) * target
        for i in range(n_in):
            a, b = corner + i * scale, corner + (i + 1) * scale
            w[j, i] = max(0.0, min(hi, b) - max(lo, a)) / target
    return w


def reference_area_mean(array: np.ndarray, corner, scale, offset, n=S, target=32.0) -> np.ndarray:
    wz, wy, wx = (overlap_weights(offset[a], target, n, corner[a], scale[a], array.shape[a]) for a in range(3))
    return np.einsum("az,by,cx,zyx->abc", wz, wy, wx, array.astype(np.float64), optimize=True)


# ----------------------------------------------------------------------------- catalog


def test_scan_finds_every_dataset_crop_and_container(catalog, cellmap_root):
    root, _ = cellmap_root
    assert catalog.root == str(root.resolve())
    assert catalog.dataset_names() == ["jrc_alpha", "jrc_beta", "jrc_gamma"]
    labels = {(d.name, entry.crop, entry.organelle, entry.kind) for d in catalog.datasets for entry in d.labels}
    assert labels == {
        ("jrc_alpha", "crop1", "mito", "groundtruth"), ("jrc_alpha", "crop1", "nuc", "groundtruth"),
        ("jrc_alpha", "crop2", "mito", "groundtruth"), ("jrc_alpha", "crop2", "cell", "groundtruth"),
        ("jrc_alpha", "inference", "mito", "inference"), ("jrc_beta", "crop3", "mito", "groundtruth"),
        ("jrc_gamma", "crop4", "cell", "groundtruth"),
    }
    gamma = next(d for d in catalog.datasets if d.name == "jrc_gamma")
    assert gamma.raw.endswith("jrc_gamma/jrc_gamma.n5/recon-1/em/fibsem-uint8")


def test_catalog_is_saved_once_and_refreshed_on_request(tmp_path):
    root, out = tmp_path / "data", tmp_path / "out"
    data.build_gamma(root)
    first = prepare_catalog(str(root), None, out, Storage())
    saved = out / CATALOG_FILE_NAME
    assert read_json(saved) == first.to_json()
    shutil.copytree(root / "jrc_gamma", root / "jrc_gamma2")
    (root / "jrc_gamma2" / "jrc_gamma.n5").rename(root / "jrc_gamma2" / "jrc_gamma2.n5")
    assert prepare_catalog(str(root), None, out, Storage()).dataset_names() == ["jrc_gamma"]  # jobs read the saved one
    refreshed = prepare_catalog(str(root), None, out, Storage(), refresh=True)
    assert refreshed.dataset_names() == ["jrc_gamma", "jrc_gamma2"]
    assert read_json(saved)["datasets"][1]["name"] == "jrc_gamma2"


def test_csv_and_json_catalogs_list_the_same_arrays(catalog, tmp_path):
    beta = next(d for d in catalog.datasets if d.name == "jrc_beta")
    label = beta.labels[0]
    (tmp_path / "cat.csv").write_text(f"dataset,raw,organelle,labels,crop\njrc_beta,{beta.raw},mito,{label.url},crop3\n")
    assert load_catalog_file(str(tmp_path / "cat.csv")).datasets == (beta,)
    # relative paths resolve against the catalog file's directory
    relative = {"datasets": [{"name": "jrc_beta", "raw": os.path.relpath(beta.raw, tmp_path), "labels": [{"organelle": "mito", "crop": "crop3", "url": os.path.relpath(label.url, tmp_path)}]}]}
    (tmp_path / "cat.json").write_text(json.dumps(relative))
    assert load_catalog_file(str(tmp_path / "cat.json")).datasets == (beta,)


# ----------------------------------------------------------------------------- geometry


def test_exact_levels_match_hand_computed_offsets(catalog, cellmap_root):
    alpha = cellmap_root[1]["jrc_alpha"]
    corner = np.asarray(data.ALPHA_CORNER)
    raw_s1 = alpha["raw"]["s1"]  # 32 nm
    offsets = set()
    for index in INDICES:
        crop = sample(catalog, index, crop_filter=("crop2",))
        d = crop.description
        offset = np.asarray(crop.offset_nm)
        offsets.add(tuple(offset))
        assert (d["dataset"], d["crop"], d["label_kind"]) == ("jrc_alpha", "crop2", "groundtruth")
        assert d["levels"]["raw"]["level"] == "s1" and not d["levels"]["raw"]["resampled"]
        assert d["levels"]["mito"]["level"] == "s1" and d["levels"]["mito"]["resampled"]  # 64 nm: no 128 nm level
        assert d["offset_nm"] == offset.tolist()
        # on the 128 nm grid from the raw corner, inside the raw
        steps = (offset - corner) / 128
        assert np.allclose(steps, np.round(steps)) and (offset >= corner).all() and (offset + 2048 <= corner + 3072).all()
        i0 = ((offset - corner) / 32).astype(int)
        np.testing.assert_array_equal(crop.raw, raw_s1[i0[0] : i0[0] + S, i0[1] : i0[1] + S, i0[2] : i0[2] + S])
        labels, mask = reference_labels(alpha["crop2"]["mito"]["s1"], alpha["crop2"]["corner"], [64] * 3, offset)
        np.testing.assert_array_equal(crop.mask, mask.astype(np.uint8))
        np.testing.assert_array_equal(crop.gt, labels)
        assert crop.gt.dtype == np.uint64 and crop.gt.max() > 2**32  # instance ids kept, never wrapped
        assert d["paths"]["raw"].endswith("fibsem-uint8/s1") and d["paths"]["mito"].endswith("crop2/mito/s1")
    assert len(offsets) > 1


def test_anisotropic_raw_is_area_mean_of_the_finer_level(catalog, cellmap_root):
    beta = cellmap_root[1]["jrc_beta"]
    for index in INDICES[:3]:
        crop = sample(catalog, index, crop_filter=("crop3",))
        d = crop.description
        assert d["levels"]["raw"]["level"] == "s0" and d["levels"]["raw"]["resampled"]
        assert d["levels"]["raw"]["voxel_size_nm"] == [20.0, 16.0, 16.0]
        assert d["levels"]["mito"]["level"] == "s1" and d["levels"]["mito"]["voxel_size_nm"] == [80.0, 64.0, 64.0]
        offset = crop.offset_nm
        expected = reference_area_mean(beta["raw"]["s0"], data.BETA_CORNER, data.BETA_RAW_SCALES[0], offset)
        assert np.abs(crop.raw.astype(float) - expected).max() <= 0.5 + 1e-3  # rounded to uint8
        labels, mask = reference_labels(beta["crop3"]["mito"]["s1"], data.BETA_CORNER, [80, 64, 64], offset)
        np.testing.assert_array_equal(crop.gt, labels)
        assert crop.gt.dtype == np.uint32


def test_n5_container_reads_like_zarr(catalog, cellmap_root):
    gamma = cellmap_root[1]["jrc_gamma"]
    crop = sample(catalog, 0, organelles=("cell",), crop_filter=("crop4",))
    offset = np.asarray(crop.offset_nm)
    i0 = (offset / 32).astype(int)
    np.testing.assert_array_equal(crop.raw, gamma["raw"]["s0"][i0[0] : i0[0] + S, i0[1] : i0[1] + S, i0[2] : i0[2] + S])
    j0 = (offset / 128).astype(int)
    np.testing.assert_array_equal(crop.gt, gamma["crop4"]["cell"]["s0"][j0[0] : j0[0] + N, j0[1] : j0[1] + N, j0[2] : j0[2] + N])
    assert crop.gt.dtype == np.uint64 and not crop.description["levels"]["cell"]["resampled"]


def raw_agrees_with_mito(crop) -> float:
    """Raw is bright exactly inside mitochondria: the fraction of valid label voxels whose
    raw block mean agrees with the label."""
    f = S // N
    bright = crop.raw.reshape(N, f, N, f, N, f).mean(axis=(1, 3, 5)) > (data.RAW_INSIDE + data.RAW_OUTSIDE) / 2
    valid = np.ones(crop.gt.shape, bool) if crop.mask is None else crop.mask.astype(bool)
    return float(((crop.gt > 0) == bright)[valid].mean())


@pytest.mark.parametrize("augment", [False, True])
def test_raw_and_labels_show_the_same_place(catalog, augment):
    for index in INDICES:
        crop = sample(catalog, index, augment=augment, filters=LabelFilters(0.02, 2, 0.05))
        assert raw_agrees_with_mito(crop) > 0.9, crop.description


# ----------------------------------------------------------------------------- determinism


def test_same_index_same_crop_across_runs_and_catalog_orderings(catalog, tmp_path):
    document = catalog.to_json()
    shuffled = json.loads(json.dumps(document))
    random.Random(5).shuffle(shuffled["datasets"])
    for d in shuffled["datasets"]:
        random.Random(7).shuffle(d["labels"])
    assert shuffled != document
    reordered = catalog_from_json(shuffled, "shuffled", None)
    assert reordered.sha256() == catalog.sha256()
    seen = set()
    for index in INDICES:
        a, b, c = sample(catalog, index), sample(catalog, index), sample(reordered, index)
        for other in (b, c):
            assert a.offset_nm == other.offset_nm and a.description["paths"] == other.description["paths"]
            np.testing.assert_array_equal(a.raw, other.raw)
            np.testing.assert_array_equal(a.gt, other.gt)
        seen.add((a.description["dataset"], a.description["crop"], a.offset_nm))
    assert len(seen) > 2


# ----------------------------------------------------------------------------- labels


def test_several_organelles_become_classes_later_wins(catalog, cellmap_root):
    alpha = cellmap_root[1]["jrc_alpha"]
    corner = alpha["crop1"]["corner"]
    overlaps = 0
    for organelles in (("mito", "nuc"), ("nuc", "mito")):
        crop = sample(catalog, 2, organelles=organelles)
        assert crop.description["crop"] == "crop1" and crop.gt.dtype == np.uint8
        per = {o: reference_labels(alpha["crop1"][o]["s1"], corner, [128] * 3, crop.offset_nm)[0] for o in organelles}
        first, second = (per[o] > 0 for o in organelles)
        expected = np.where(second, 2, np.where(first, 1, 0))
        np.testing.assert_array_equal(crop.gt, expected * crop.mask)
        overlaps += int((first & second).sum())
    assert overlaps > 0  # the rule was exercised


def test_semantic_labels_alone_become_uint32_ids(catalog):
    crop = sample(catalog, 0, organelles=("nuc",))
    assert crop.gt.dtype == np.uint32 and set(np.unique(crop.gt)) <= {0, 1}


def test_inference_filter_uses_inference_labels_for_those_datasets(catalog):
    options = SamplingOptions(organelles=("mito",), inference_filter=("jrc_alpha",))
    units = {(u.dataset, u.crop) for u in eligible_units(catalog, options)}
    assert units == {("jrc_alpha", "inference"), ("jrc_beta", "crop3")}
    kinds = set()
    for index in INDICES:
        crop = sample(catalog, index, inference_filter=("jrc_alpha",))
        kinds.add(crop.description["label_kind"])
        if crop.description["dataset"] == "jrc_alpha":
            assert "inference/segmentations/mito" in crop.description["paths"]["mito"]
            assert crop.mask.all()  # inference labels cover the whole raw
    assert kinds == {"inference", "groundtruth"}
    with pytest.raises(SourceError, match="jrc_beta named by --inference-filter have no inference labels"):
        sample(catalog, 0, inference_filter=("jrc_beta",))


def test_crop_filter_limits_to_given_crops(catalog):
    assert {sample(catalog, i, crop_filter=("1",)).description["crop"] for i in INDICES} == {"crop1"}
    with pytest.raises(SourceError, match="crop9 named by --crop-filter are in no dataset"):
        sample(catalog, 0, crop_filter=("crop9",))
    with pytest.raises(SourceError, match="no dataset has a ground-truth crop holding all of mito, nuc among crops crop2"):
        sample(catalog, 0, organelles=("mito", "nuc"), crop_filter=("crop2",))


# ----------------------------------------------------------------------------- GT extension and filters


def test_gt_extension_reaches_past_the_box_and_masks_it(catalog):
    crop = sample(catalog, 0, crop_filter=("crop1",))
    assert crop.mask is not None and 0 < crop.mask.mean() < 1  # the 1024 nm box inside a 2048 nm window
    assert not crop.gt[crop.mask == 0].any()


def test_without_gt_extension_crops_stay_inside_the_box(catalog, cellmap_root):
    alpha = cellmap_root[1]["jrc_alpha"]
    lo = alpha["crop2"]["corner"]
    hi = lo + alpha["crop2"]["extent"]
    unknown_voxels = set()
    for index in INDICES:
        crop = sample(catalog, index, crop_filter=("crop2",), gt_extension=False)
        offset = np.asarray(crop.offset_nm)
        assert (offset >= lo).all() and (offset + 2048 <= hi).all()
        # every voxel is annotated; only crop2's 'unknown' slab needs a mask
        known_z = offset[0] + (np.arange(N) + 0.5) * 128 >= alpha["crop2"]["unknown_below_z"]
        if known_z.all():
            assert crop.mask is None
        else:
            unknown_voxels.add(index)
            np.testing.assert_array_equal(crop.mask, np.broadcast_to(known_z[:, None, None], (N, N, N)).astype(np.uint8))
    assert unknown_voxels  # some windows reached the unknown slab
    with pytest.raises(SourceError, match="no candidate crop can hold a 2048 nm window.*allow GT extension"):
        sample(catalog, 0, crop_filter=("crop1",), gt_extension=False)


def test_unknown_voxels_are_masked_absent_and_left_out_of_the_filters(catalog, cellmap_root):
    """crop2 mito stores 255 ('unknown' in its cellmap encoding) in its first 512 nm of z."""
    alpha = cellmap_root[1]["jrc_alpha"]
    seen_unknown = 0
    for index in INDICES:
        crop = sample(catalog, index, crop_filter=("crop2",))
        d = crop.description
        assert d["annotation_encodings"]["mito"]["encoding"] == data.INSTANCE_ENCODING
        assert d["annotation_encodings"]["mito"]["from"].endswith("crop2/mito/s1")  # the array's own attributes
        centres_z = crop.offset_nm[0] + (np.arange(N) + 0.5) * 128
        unknown = np.broadcast_to((centres_z < alpha["crop2"]["unknown_below_z"])[:, None, None], crop.gt.shape)
        assert not crop.mask[unknown].any() and not crop.gt[unknown].any()
        assert d["unknown_voxels"] == int((unknown & reference_labels(alpha["crop2"]["cell"]["s1"], alpha["crop2"]["corner"], [64] * 3, crop.offset_nm)[1]).sum())
        assert data.UNKNOWN not in np.unique(crop.gt)
        valid = crop.mask.astype(bool)
        measured = d["filter_measurements"]
        assert measured["ground_truth_fraction"] == valid.mean()
        assert measured["label_fraction"] == (crop.gt[valid] > 0).mean()
        assert measured["unique_ids"] == np.unique(crop.gt[valid]).size
        seen_unknown += d["unknown_voxels"]
    assert seen_unknown > 0
    # semantic encodings decode too, and arrays without cellmap attributes read as stored
    nuc = sample(catalog, 0, organelles=("nuc",))
    assert nuc.description["annotation_encodings"]["nuc"]["type"] == "semantic"
    inference = sample(catalog, 0, inference_filter=("jrc_alpha",), crop_filter=())
    if inference.description["dataset"] == "jrc_alpha":
        assert inference.description["annotation_encodings"]["mito"] is None


def test_encoding_decodes_each_possibility():
    semantic = AnnotationEncoding("semantic", {"absent": 7, "present": 3, "unknown": 0}, "here")
    labels, known = semantic.decode(np.array([7, 3, 0, 3], np.uint8))
    assert labels.tolist() == [0, 1, 0, 1] and known.tolist() == [True, True, False, True]
    instance = AnnotationEncoding("instance", {"absent": 0, "unknown": 255}, "here")
    labels, known = instance.decode(np.array([0, 9, 255, 2**40], np.uint64))
    assert labels.tolist() == [0, 9, 0, 2**40] and known.tolist() == [True, True, False, True]


@pytest.mark.parametrize(
    "annotation_type, why",
    [
        ({"type": "boxes", "encoding": {}}, "type is not one of"),
        ({"type": "instance_segmentation"}, "no 'encoding' object"),
        ({"type": "instance_segmentation", "encoding": {"present": 1}}, "has key"),
        ({"type": "semantic_segmentation", "encoding": {"absent": 0, "present": 0}}, "the same value"),
    ],
)
def test_corrupt_encodings_are_named(annotation_type, why):
    with pytest.raises(SourceError, match=f"corrupt cellmap annotation metadata at here: .*{why}"):
        parse_encoding({"cellmap": {"annotation": {"annotation_type": annotation_type}}}, "here")
    assert parse_encoding({"multiscales": []}, "here") is None


@pytest.mark.parametrize(
    "filters, measure, threshold",
    [
        (LabelFilters(0.09, 0, 0.0), "label_fraction", 0.09),
        (LabelFilters(0.0, 21, 0.0), "unique_ids", 21),
        (LabelFilters(0.0, 0, 0.9), "ground_truth_fraction", 0.9),
    ],
)
def test_each_filter_rejects_and_accepts_by_its_measure(catalog, filters, measure, threshold):
    attempts = []
    for index in INDICES:
        crop = sample(catalog, index, filters=filters)
        assert crop.description["filter_measurements"][measure] >= threshold
        attempts.append(crop.description["candidate_attempt"])
    assert max(attempts) > 0  # some candidates were drawn and rejected
    impossible = {"label_fraction": LabelFilters(1.01, 0, 0), "unique_ids": LabelFilters(0, 10**6, 0), "ground_truth_fraction": LabelFilters(0, 0, 1.01)}[measure]
    with pytest.raises(SourceError, match="none of 100 candidate crops passed the filters.*best seen"):
        sample(catalog, 0, filters=impossible)


# ----------------------------------------------------------------------------- augmentation


def test_augmentation_is_one_transform_of_raw_and_labels(catalog):
    params_seen = set()
    for index in INDICES:
        plain, augmented = sample(catalog, index), sample(catalog, index, augment=True)
        params = augmented.description["augmentation"]
        assert plain.description["augmentation"] is None and params == draw_augmentation(index)
        params_seen.add(json.dumps(params, sort_keys=True))
        np.testing.assert_array_equal(augmented.gt, transform_geometry(plain.gt, params))
        np.testing.assert_array_equal(augmented.mask, transform_geometry(plain.mask, params))
        moved = transform_geometry(plain.raw, params)
        np.testing.assert_array_equal(augmented.raw, transform_intensity(moved, plain.raw_range, params))
        # the intensity map is one monotone table for every voxel: equal raw stays equal
        for value in np.unique(moved)[:5]:
            assert np.unique(augmented.raw[moved == value]).size == 1
    assert len(params_seen) == len(INDICES)


def unmove_by_affine(stored: np.ndarray, affine, grid) -> np.ndarray:
    """Put each stored voxel where the recorded affine says its centre lies in the world,
    on the crop's unaugmented grid (offset, voxel size): the reader's way back."""
    a = np.asarray(affine, float)
    index = np.indices(stored.shape).reshape(3, -1)
    world = a[:3, :3] @ index + a[:3, 3:]
    unmoved = (world - np.asarray(grid["offset_nm"])[:, None]) / np.asarray(grid["voxel_size_nm"])[:, None] - 0.5
    target = np.rint(unmoved).astype(int)
    assert np.allclose(unmoved, target) and target.min() >= 0 and target.max() < stored.shape[0]
    out = np.zeros_like(stored)
    out[tuple(target)] = stored.reshape(-1)
    assert np.unique(np.ravel_multi_index(tuple(target), stored.shape)).size == stored.size  # one voxel each
    return out


def test_recorded_world_transform_maps_augmented_crops_back(catalog):
    for index in INDICES:
        plain, augmented = sample(catalog, index), sample(catalog, index, augment=True)
        identity = plain.description["world_transform"]
        assert identity["axis_order"] == [0, 1, 2] and identity["flip"] == [False] * 3
        record = augmented.description["world_transform"]
        params = augmented.description["augmentation"]
        assert (record["axis_order"], record["flip"]) == (params["axis_order"], params["flip"])
        assert augmented.label_grid == plain.label_grid and augmented.raw_grid == plain.raw_grid
        labels = {"offset_nm": list(plain.offset_nm), "voxel_size_nm": [GEOMETRY.base_resolution] * 3}
        np.testing.assert_array_equal(unmove_by_affine(augmented.gt, record["affine_nm"]["labels"], labels), plain.gt)
        np.testing.assert_array_equal(unmove_by_affine(augmented.mask, record["affine_nm"]["labels"], labels), plain.mask)
        raw = {"offset_nm": list(plain.offset_nm), "voxel_size_nm": [GEOMETRY.min_resolution_for_raw] * 3}
        positions = np.arange(S**3).reshape(S, S, S)  # which voxel went where, free of the intensity change
        np.testing.assert_array_equal(unmove_by_affine(transform_geometry(positions, params), record["affine_nm"]["raw"], raw), positions)
        np.testing.assert_array_equal(augmented.world_transform.undo(augmented.gt), plain.gt)


# ----------------------------------------------------------------------------- metadata parsing


@pytest.mark.parametrize(
    "attributes, why",
    [
        ({}, "no 'multiscales' list"),
        ({"multiscales": [{"datasets": []}]}, "no 'datasets' levels"),
        ({"multiscales": [{"datasets": [{"path": "s0"}]}]}, "without 'coordinateTransformations'"),
        ({"multiscales": [{"datasets": [{"path": "s0", "coordinateTransformations": [{"type": "scale", "scale": [1, 2]}]}]}]}, "is not 3 numbers"),
        ({"multiscales": [{"axes": ["c", "y", "x"], "datasets": []}]}, "not the three spatial axes"),
        ({"multiscales": [{"datasets": [{"path": "s0", "coordinateTransformations": [{"type": "scale", "scale": [0, 1, 1]}]}]}]}, "non-positive scale"),
    ],
)
def test_corrupt_multiscale_metadata_is_named(attributes, why):
    with pytest.raises(SourceError, match=f"corrupt multiscale metadata at grp: .*{why}"):
        parse_multiscale("grp", "zarr", attributes)


def test_n5_transform_listed_fastest_first_is_read_in_c_order():
    attributes = {"multiscales": [{"datasets": [{"path": "s0", "transform": {
        "axes": ["x", "y", "z"], "ordering": "F", "scale": [4, 4, 8], "translate": [1, 2, 3], "units": ["nm"] * 3}}]}]}
    multiscale = parse_multiscale("grp", "n5", attributes)
    assert multiscale.levels[0].scale == (8.0, 4.0, 4.0) and multiscale.levels[0].translation == (3.0, 2.0, 1.0)
    assert multiscale.axis_order == (0, 1, 2)


def test_axes_in_another_order_and_micrometres_are_converted():
    attributes = {"multiscales": [{
        "axes": [{"name": "x", "unit": "micrometer"}, {"name": "y", "unit": "micrometer"}, {"name": "z", "unit": "micrometer"}],
        "datasets": [{"path": "s0", "coordinateTransformations": [{"type": "scale", "scale": [0.004, 0.004, 0.008]}, {"type": "translation", "translation": [1, 2, 3]}]}],
    }]}
    level = parse_multiscale("grp", "zarr", attributes).levels[0]
    assert level.scale == (8.0, 4.0, 4.0) and level.translation == (3000.0, 2000.0, 1000.0)


# ----------------------------------------------------------------------------- S3 (moto_server)


@pytest.fixture(scope="module")
def moto_s3(cellmap_root):
    """A real S3-compatible server on 127.0.0.1 holding jrc_alpha as a public bucket."""
    with s3_server_holding(cellmap_root[0], "jrc_alpha") as endpoint:
        yield endpoint


@pytest.mark.parametrize("credentials", ["anonymous", "environment"])
def test_s3_crop_equals_local_crop(moto_s3, catalog, monkeypatch, credentials):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    if credentials == "environment":
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    storage = Storage(S3Options(endpoint=moto_s3))
    assert storage.s3.anonymous == (credentials == "anonymous")
    remote = prepare_catalog("s3://cellmap-test/data", None, None, storage)
    local = only(catalog, "jrc_alpha")
    assert [(d.name, len(d.labels)) for d in remote.datasets] == [(d.name, len(d.labels)) for d in local.datasets]
    for index in INDICES[:3]:
        a = sample(remote, index, storage=storage)
        b = sample(local, index)
        assert a.description["paths"]["raw"].startswith("s3://cellmap-test/data/jrc_alpha/")
        assert a.offset_nm == b.offset_nm and a.description["crop"] == b.description["crop"]
        np.testing.assert_array_equal(a.raw, b.raw)
        np.testing.assert_array_equal(a.gt, b.gt)
        np.testing.assert_array_equal(a.mask, b.mask)


# ----------------------------------------------------------------------------- the CLI


def cli_args(out: Path, model: Path, index: int = 0, *extra: str) -> list[str]:
    return ["--volume-index", str(index), "--output-dir", str(out), "--model-id", str(model), *TINY_GEOMETRY_ARGS, *extra]


def test_cli_end_to_end_from_a_data_root(cellmap_root, tiny_model_dir, tmp_path):
    root = cellmap_root[0]
    out = tmp_path / "cache"
    env = {"DINOV3_DATA_ROOT": ""}
    run_script("preprocess_volume.py", *cli_args(out, tiny_model_dir, 1, "--data-root", str(root), "--organelles", "mito"), check=True, env=env)
    assert (out / CATALOG_FILE_NAME).is_file()
    metadata = read_json(VolumePaths(out, 1).metadata)
    source = metadata["source_dataset"]
    crop = sample(prepare_catalog(str(root), None, out, Storage()), 1, filters=LabelFilters())
    assert source["offset_nm"] == list(crop.offset_nm) == metadata["configuration"]["offset_nm"]
    assert source["dataset"] == crop.description["dataset"] and source["paths"] == crop.description["paths"]
    assert {"dataset", "crop", "paths", "levels", "voxel_size_nm", "offset_nm", "catalog_sha256"} <= set(source)
    assert metadata["configuration"]["fingerprint_inputs"]["source"]["catalog_sha256"] == source["catalog_sha256"]
    np.testing.assert_array_equal(open_array(VolumePaths(out, 1).array("gt")).read().result(), crop.gt)
    np.testing.assert_array_equal(open_array(VolumePaths(out, 1).array("mask")).read().result(), crop.mask)
    # the environment variable selects the same source; a rerun is skipped
    again = run_script("preprocess_volume.py", *cli_args(out, tiny_model_dir, 1, "--organelles", "mito"), env={"DINOV3_DATA_ROOT": str(root)})
    assert again.returncode == 0 and "skipping" in again.stdout


def test_cellmap_options_pass_through_to_jobs():
    from dinov3_cache.extraction.settings import add_extraction_arguments, settings_from_args

    parser = argparse.ArgumentParser()
    add_extraction_arguments(parser)
    args = parser.parse_args(["--output-dir", "o", "--data-root", "s3://b/p", "--s3-endpoint", "http://h:1", "--augment", "--refresh-catalog"])
    values = settings_from_args(args).values()  # what the submission's settings file holds
    assert values["data_root"] == "s3://b/p" and values["s3_endpoint"] == "http://h:1"
    assert values["augment"] is True and "refresh_catalog" not in values  # jobs read the saved catalog


@pytest.fixture(scope="module")
def corrupt_root(tmp_path_factory) -> Path:
    """One N5 dataset whose raw multiscale metadata lists two axes for a 3-d array."""
    root = tmp_path_factory.mktemp("corrupt") / "data"
    data.build_gamma(root)
    attributes = data.raw_group(root, "jrc_gamma", "n5") / "attributes.json"
    attributes.write_text(json.dumps({"n5": "2.0.0", "multiscales": [{"datasets": [{"path": "s0", "transform": {"axes": ["z", "y"], "scale": [32, 32]}}]}]}))
    return root


@pytest.mark.parametrize(
    "case, extra, expected",
    [
        ("no source", [], "no data source given: pass --data-root ROOT"),
        ("missing root", ["--data-root", "{tmp}/nowhere"], "does not exist; check --data-root"),
        ("missing dataset", ["--data-root", "{root}", "--inference-filter", "jrc_nope"], "jrc_nope named by --inference-filter are not in the catalog"),
        ("absent organelle", ["--data-root", "{root}", "--organelles", "golgi"], "golgi appear in no dataset of the catalog"),
        ("too fine", ["--data-root", "{root}", "--min-resolution-for-raw", "8"], "raw at 8 nm (--min-resolution-for-raw) is finer than every level"),
        ("corrupt metadata", ["--data-root", "{corrupt}", "--organelles", "cell"], "corrupt multiscale metadata at"),
        ("unreachable s3", ["--data-root", "s3://cellmap-test/data", "--s3-endpoint", "http://127.0.0.1:{port}"], "cannot reach the S3 endpoint http://127.0.0.1"),
    ],
)
def test_bad_inputs_give_one_clear_line(case, extra, expected, cellmap_root, corrupt_root, tiny_model_dir, tmp_path, monkeypatch):
    for name in ("DINOV3_DATA_ROOT", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    fill = {"root": str(cellmap_root[0]), "corrupt": str(corrupt_root), "tmp": str(tmp_path), "port": str(free_port())}
    out = tmp_path / "cache"
    result = run_script(
        "preprocess_volume.py", *cli_args(out, tiny_model_dir, 0, *[e.format(**fill) for e in extra])
    )
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    bad_options = case in ("no source", "missing dataset", "absent organelle")  # found before the model loads
    assert result.returncode == (2 if bad_options else 1), result.stderr
    assert "Traceback" not in result.stderr and len(errors) == 1 and expected in errors[0], result.stderr
    assert not list(out.glob("volume_*_metadata.json")) if out.exists() else True


def test_cli_reads_s3_through_the_endpoint_option(moto_s3, cellmap_root, tiny_model_dir, tmp_path, monkeypatch):
    for name in ("DINOV3_DATA_ROOT", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    out = tmp_path / "cache"
    run_script(
        "preprocess_volume.py",
        *cli_args(out, tiny_model_dir, 2, "--data-root", "s3://cellmap-test/data", "--s3-endpoint", moto_s3, "--organelles", "mito"),
        check=True,
    )
    source = read_json(VolumePaths(out, 2).metadata)["source_dataset"]
    assert source["paths"]["raw"].startswith("s3://cellmap-test/data/jrc_alpha/jrc_alpha.zarr/")
    assert read_json(out / CATALOG_FILE_NAME)["root"] == "s3://cellmap-test/data"


def run_catalog_command(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dinov3_cache.sources.cellmap", *args],
        capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[1],
    )


def test_catalog_command_builds_and_reports(cellmap_root, tmp_path, monkeypatch):
    monkeypatch.delenv("DINOV3_DATA_ROOT", raising=False)
    result = run_catalog_command("--data-root", str(cellmap_root[0]), "--output-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "3 dataset(s)" in result.stdout and (tmp_path / CATALOG_FILE_NAME).is_file()
    failed = run_catalog_command("--output-dir", str(tmp_path))
    assert failed.returncode == 1 and failed.stderr.startswith("error: the CellMap source needs --data-root")


def test_a_read_too_large_for_memory_is_refused(catalog, monkeypatch):
    import dinov3_cache.sources.cellmap.reading as reading

    monkeypatch.setattr(reading, "MAX_RAW_READ_BYTES", 64**3)  # beta's resampled raw needs more
    with pytest.raises(SourceError, match=r"is much finer than 32 nm: one crop would read .* GiB"):
        sample(catalog, 0, crop_filter=("crop3",))
    sample(catalog, 0, crop_filter=("crop2",))  # an exact level reads exactly 64^3


def test_arrays_stored_x_y_z_are_read_as_z_y_x(tmp_path):
    """OME-NGFF axes listed x, y, z: the stored array is transposed back, scales follow."""
    rng = np.random.default_rng(4)
    zyx_raw = rng.integers(0, 256, (70, 80, 90), dtype=np.uint8)  # 32 nm voxels
    zyx_labels = rng.integers(0, 5, (18, 20, 23), dtype=np.uint32)  # 128 nm voxels
    root = tmp_path / "data"
    for group, array, scale in ((data.raw_group(root, "jrc_xyz"), zyx_raw, 32.0), (data.crop_group(root, "jrc_xyz", "crop1", "mito"), zyx_labels, 128.0)):
        data.write_array(group / "s0", np.ascontiguousarray(array.transpose(2, 1, 0)), "zarr", (32, 32, 32))
        attributes = data.ome_multiscales([("s0", [scale] * 3, [scale / 2] * 3)])
        attributes["multiscales"][0]["axes"] = attributes["multiscales"][0]["axes"][::-1]
        data.write_group_attributes(group, "zarr", attributes)
    crop = sample(prepare_catalog(str(root), None, None, Storage()), 0, gt_extension=False)
    k = (np.asarray(crop.offset_nm) / 128).astype(int)
    np.testing.assert_array_equal(crop.raw, zyx_raw[4 * k[0] : 4 * k[0] + S, 4 * k[1] : 4 * k[1] + S, 4 * k[2] : 4 * k[2] + S])
    np.testing.assert_array_equal(crop.gt, zyx_labels[k[0] : k[0] + N, k[1] : k[1] + N, k[2] : k[2] + N])
