"""probe_features.py: a linear probe on a cache's features, its baselines and its refusals,
on small synthetic caches made with the random tiny model."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import tensorstore as ts
from conftest import call_main, preprocess_args

from dinov3_cache.audit.png import decode_png
from dinov3_cache.paths import VolumePaths
from dinov3_cache.probe import run_probe
from dinov3_cache.probe.options import ProbeOptions, split_indices
from dinov3_cache.zarr_arrays import block_checksums

TRAIN, TEST = "0-3", "4-5"
STEPS = 60


def build(out, model_dir, indices: str, *extra: str):
    call_main("preprocess_volume", *preprocess_args(out, indices, model_dir, *extra), check=True)
    return out


def open_zarr(path):
    return ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": str(path)}}).result()


def rewrite_array(cache, index: int, array: str, values: np.ndarray) -> None:
    """Store other values in a volume's array and record their checksums: a legitimate cache
    of other data, not a damaged one (the loader refuses damage)."""
    paths = VolumePaths(cache, index)
    open_zarr(paths.array(array))[...] = values
    metadata = json.loads(paths.metadata.read_text())
    integrity = metadata["integrity"]
    integrity["crc32"][array] = block_checksums(values, (0,) * values.ndim, integrity["chunks"][array])
    paths.metadata.write_text(json.dumps(metadata))


@pytest.fixture(scope="module")
def caches(tmp_path_factory, tiny_model_dir):
    """The same volumes 0-5 cached dense and as tokens, and a copy of the dense cache whose
    features are noise (labels untouched)."""
    root = tmp_path_factory.mktemp("probe")
    dense = build(root / "dense", tiny_model_dir, "0-5")
    tokens = build(root / "tokens", tiny_model_dir, "0-5", "--layout", "tokens")
    noise = root / "noise"
    shutil.copytree(dense, noise)
    rng = np.random.default_rng(0)
    for index in range(6):
        features = open_zarr(VolumePaths(noise, index).array("features"))
        rewrite_array(noise, index, "features", rng.standard_normal(features.shape).astype(features.dtype.numpy_dtype))
    return {"dense": dense, "tokens": tokens, "noise": noise}


@pytest.fixture(scope="module")
def side_by_side(caches, tmp_path_factory):
    """One run of the three caches side by side, with its JSON, PNG and saved predictions."""
    out = tmp_path_factory.mktemp("probe_out")
    rows = run_probe(
        [caches["dense"], caches["tokens"], caches["noise"]], train_indices=range(4), test_indices=[4, 5],
        steps=STEPS, json_path=out / "rows.json", png_path=out / "slice.png", predictions_dir=out / "predictions",
        progress=False, print_table=False,
    )
    return {row["name"]: row for row in rows}, rows, out


def test_features_beat_the_majority_class_and_scores_match_the_saved_predictions(caches, side_by_side):
    by_name, rows, out = side_by_side
    assert [r["kind"] for r in rows] == ["features", "features", "features", "majority", "raw"]
    # the random 2-layer model's 32 channels: 0.53 against 0.46 (a noise cache: 0.33)
    assert by_name["dense"]["mean_iou"] > by_name["majority class"]["mean_iou"] + 0.05
    # IoU computed again from the saved predictions and the stored labels, read with plain TensorStore
    for position, row in enumerate(rows[:4]):
        for cls, name in enumerate(("background", "cell")):
            intersection = union = 0
            for index in (4, 5):
                prediction = np.load(out / "predictions" / f"row{position}_volume_{index:06d}.npy")
                paths = VolumePaths(caches["dense"], index)
                known = open_zarr(paths.array("mask")).read().result() > 0
                truth = (open_zarr(paths.array("gt")).read().result() > 0).astype(int)
                intersection += np.sum((prediction == cls) & (truth == cls) & known)
                union += np.sum(((prediction == cls) | (truth == cls)) & known)
            assert row["per_class"][name]["iou"] == pytest.approx(intersection / union, abs=1e-12)
    assert json.loads((out / "rows.json").read_text()) == rows
    assert decode_png((out / "slice.png").read_bytes()).shape[1] > 4 * 256  # raw, labels and 4 predictions


def test_noise_features_score_clearly_worse_than_the_true_cache(side_by_side):
    by_name = side_by_side[0]
    assert by_name["noise"]["mean_iou"] < by_name["dense"]["mean_iou"] - 0.15  # 0.33 against 0.53


def test_labels_shifted_against_the_features_score_clearly_worse(caches, side_by_side, tmp_path):
    shifted = tmp_path / "shifted"
    shutil.copytree(caches["dense"], shifted)
    for index in range(6):
        for array in ("gt", "mask"):
            stored = open_zarr(VolumePaths(shifted, index).array(array)).read().result()
            rewrite_array(shifted, index, array, np.roll(stored, (3, 3, 3), axis=(0, 1, 2)))
    rows = run_probe([shifted], train_indices=range(4), test_indices=[4, 5], steps=STEPS, progress=False, print_table=False)
    assert rows[0]["mean_iou"] < side_by_side[0]["dense"]["mean_iou"] - 0.15  # 0.31 against 0.53
    assert rows[-1]["reachable"] is False and "does not match the cache's labels" in rows[-1]["note"]


def test_dense_and_token_caches_of_the_same_volumes_score_the_same(side_by_side):
    by_name = side_by_side[0]
    assert by_name["tokens"]["mean_iou"] == pytest.approx(by_name["dense"]["mean_iou"], abs=0.02)
    for name in ("background", "cell"):
        assert by_name["tokens"]["per_class"][name]["iou"] == pytest.approx(by_name["dense"]["per_class"][name]["iou"], abs=0.03)


def test_raw_baseline_is_read_again_from_the_synthetic_source(side_by_side):
    raw = side_by_side[0]["raw + filters"]
    assert raw["raw_from"] == "the synthetic source crop, read again"
    assert raw["mean_iou"] > side_by_side[0]["majority class"]["mean_iou"]


def test_the_command_line_prints_the_table_and_repeats_the_same_numbers(caches, side_by_side, tmp_path):
    result = call_main("probe_features", "--cache", caches["dense"], "--train-indices", TRAIN, "--test-indices", TEST,
                       "--steps", STEPS, "--json", tmp_path / "rows.json", check=True)
    assert "majority class" in result.stdout and "waiting for data" in result.stdout
    assert f"step {STEPS}/{STEPS}" in result.stderr
    dense = json.loads((tmp_path / "rows.json").read_text())[0]
    assert dense == side_by_side[0]["dense"]  # deterministic on the CPU: same seed, same scores


def test_raw_comes_from_the_recorded_cellmap_crop_or_the_table_says_it_is_unreachable(tiny_model_dir, tmp_path):
    import cellmap_data

    root = tmp_path / "data"
    for build_dataset in (cellmap_data.build_alpha, cellmap_data.build_beta, cellmap_data.build_gamma):
        build_dataset(root)
    cache = build(tmp_path / "cellmap", tiny_model_dir, "0-3", "--data-root", str(root), "--organelles", "mito", "--source", "cellmap")
    rows = run_probe([cache], test_indices=[3], steps=5, progress=False, print_table=False)
    assert rows[-1]["raw_from"] == "the cellmap source crop, read again" and rows[-1]["mean_iou"] is not None
    root.rename(tmp_path / "moved")
    result = call_main("probe_features", "--cache", cache, "--test-indices", "3", "--steps", "5", check=True)
    raw_line = next(line for line in result.stdout.splitlines() if line.startswith("raw + filters"))
    assert "raw not reachable: volume 0 has no raw array (extract with --save-raw)" in raw_line


# ----------------------------------------------------------------------------- bad input


def one_error_line(result, exit_status: int, fragment: str) -> None:
    """Exactly one `error:` line, the last one (progress lines may come before it), no traceback."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == exit_status, result.stderr
    assert [line for line in lines if line.startswith("error: ")] == lines[-1:], result.stderr
    assert fragment in lines[-1] and "Traceback" not in result.stderr, result.stderr


def zero_labels(cache, index):
    gt = open_zarr(VolumePaths(cache, index).array("gt"))
    gt[...] = np.zeros(gt.shape, gt.dtype.numpy_dtype)


def test_bad_input_is_one_error_line_each(caches, tiny_model_dir, tmp_path):
    dense = caches["dense"]
    probe = lambda *args: call_main("probe_features", "--steps", "5", *map(str, args))  # noqa: E731
    (tmp_path / "empty").mkdir()
    one_error_line(probe("--cache", tmp_path / "empty"), 2, "no preprocessed volumes found")
    single = tmp_path / "single"
    single.mkdir()
    for path in dense.glob("volume_000000*"):
        (shutil.copytree if path.is_dir() else shutil.copy)(path, single / path.name)
    one_error_line(probe("--cache", single), 2, "no test volumes")
    one_error_line(probe("--cache", dense, "--train-indices", "0-4", "--test-indices", "4-5"), 2, "in both --train-indices")
    one_error_line(probe("--cache", dense, "--test-indices", "9"), 2, "not committed")
    one_error_line(probe("--cache", dense, "--steps", "0"), 2, "--steps must be at least 1")
    absent = tmp_path / "absent"
    shutil.copytree(dense, absent)
    zero_labels(absent, 0)
    zero_labels(absent, 1)
    one_error_line(probe("--cache", absent, "--train-indices", "0-1", "--test-indices", "4"), 2, "class cell has no labelled voxel")
    classes = build(tmp_path / "classes", tiny_model_dir, "0-1", "--organelles", "cell", "nuc")
    one_error_line(probe("--cache", dense, classes, "--train-indices", "0", "--test-indices", "1"), 2, "has classes")
    assert split_indices(classes, ProbeOptions(caches=(classes,))) == ([0], [1])  # the default split of 2 volumes
    geometry = build(tmp_path / "geometry", tiny_model_dir, "0-1", "--output-image-dim", "8", "--base-resolution", "256")
    one_error_line(probe("--cache", dense, geometry, "--train-indices", "0", "--test-indices", "1"), 2, "has geometry")


def test_a_damaged_chunk_is_the_loaders_error_not_a_score(caches, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(caches["dense"], damaged)
    chunk = next(p for p in sorted(VolumePaths(damaged, 4).array("features").rglob("*")) if p.is_file() and not p.name.startswith("."))
    chunk.write_bytes(chunk.read_bytes()[:-7])
    result = call_main("probe_features", "--cache", damaged, "--train-indices", TRAIN, "--test-indices", TEST, "--steps", "5")
    one_error_line(result, 1, "cannot read volume 4 array 'features'")
