"""check_preprocessing.py --view: a cached CellMap volume in neuroglancer, in world nm, checked
in a real headless Chromium; the axis-naming attributes every array carries."""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import cellmap_data as data
import numpy as np
import pytest
from conftest import TINY_GEOMETRY_ARGS, call_main, run_script

from dinov3_cache.layout import VolumePaths, read_json
from dinov3_cache.zarr_arrays import read_attributes

INDEX = 1
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "neuroglancer_view.png"


@pytest.fixture(scope="module")
def cellmap_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cellmap") / "data"
    data.build_alpha(root)
    return root


@pytest.fixture(scope="module")
def cellmap_cache(cellmap_root, tmp_path_factory, tiny_model_dir) -> Path:
    """One volume of alpha's crop2 mito (raw saved) built by the real CLI."""
    root = cellmap_root
    out = tmp_path_factory.mktemp("cache")
    run_script(
        "preprocess_volume.py", "--volume-index", str(INDEX), "--output-dir", str(out), "--model-id", str(tiny_model_dir),
        *TINY_GEOMETRY_ARGS, "--data-root", str(root), "--organelles", "mito", "--crop-filter", "crop2", "--save-raw",
        check=True, env={"DINOV3_DATA_ROOT": ""},
    )
    return out


def test_every_array_names_its_axes_and_types(cellmap_cache):
    paths = VolumePaths(cellmap_cache, INDEX)
    for name in ("features", "gt", "mask", "raw"):
        attributes = read_attributes(paths.array(name))
        channels = ["c"] if name == "features" else []
        assert attributes["_ARRAY_DIMENSIONS"] == [*channels, "z", "y", "x"]
        assert attributes["types"] == ["channel"] * len(channels) + ["space"] * 3
    source = read_json(paths.metadata)["source_dataset"]
    assert source["annotation_encodings"]["mito"]["encoding"] == data.INSTANCE_ENCODING


def test_view_state_places_each_array_in_world_nm(cellmap_cache, tmp_path):
    state_file = tmp_path / "state.json"
    result = call_main("check_preprocessing", "--output-dir", str(cellmap_cache), "--view", str(INDEX), "--view-state", str(state_file), check=True)
    assert str(state_file) in result.stdout
    state = json.loads(state_file.read_text())
    layers = {layer["name"]: layer for layer in state["layers"]}
    assert set(layers) == {"raw", "gt", "mask"} and layers["gt"]["type"] == "segmentation"
    offset = read_json(VolumePaths(cellmap_cache, INDEX).metadata)["source_dataset"]["offset_nm"]
    for name, voxel in (("gt", 128.0), ("raw", 32.0)):
        transform = layers[name]["source"]["transform"]
        assert transform["outputDimensions"]["z"] == [voxel * 1e-9, "m"]
        # voxel 0's corner lands on the crop's world offset
        assert [row[3] * voxel for row in transform["matrix"]] == pytest.approx(offset)
        assert layers[name]["source"]["url"].endswith(VolumePaths(cellmap_cache, INDEX).array(name).name)


def test_view_of_a_missing_volume_is_one_line(cellmap_cache):
    result = call_main("check_preprocessing", "--output-dir", str(cellmap_cache), "--view", "7", "--view-state", "/dev/null")
    assert result.returncode != 0 and result.stderr.strip().startswith("error: volume 7 is not complete")
    assert "Traceback" not in result.stderr


def chromium_available() -> bool:
    return os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)


def screenshot(viewer, webdriver, size=(512, 512)) -> np.ndarray:
    from PIL import Image

    webdriver.sync()
    reply = viewer.screenshot(size=list(size))
    return np.asarray(Image.open(io.BytesIO(reply.screenshot.image)).convert("RGB"))


def headless_browser(viewer):
    """A headless Chromium on the viewer, and the list its console errors go to."""
    import neuroglancer.webdriver

    webdriver = neuroglancer.webdriver.Webdriver(
        viewer, headless=True, browser="chrome", docker=os.geteuid() == 0,  # root: no sandbox
        browser_binary_path=CHROMIUM, window_size=(700, 700), print_logs=False,
    )
    errors = []
    webdriver.add_log_listener(lambda log: errors.append(log.text) if log.level == "error" else None)
    return webdriver, errors


def plain_xy_section(viewer) -> None:
    with viewer.txn() as s:
        s.layout = "xy"
        s.show_axis_lines = False
        s.show_scale_bar = False
        s.cross_section_background_color = "#000000"
        s.cross_section_scale = 2048 / 512 / 32  # the 2048 nm crop fills 512 px (in units of the 32 nm raw voxel)


def shown(viewer, webdriver, names: list[str]) -> np.ndarray:
    """A screenshot with only the named layers visible."""
    with viewer.txn() as s:
        for layer in s.layers:
            layer.visible = layer.name in names
    return screenshot(viewer, webdriver)


@pytest.mark.skipif(not chromium_available(), reason="needs Debian's chromium and chromium-driver (.ci/run installs them)")
def test_gt_lands_on_raw_in_a_real_browser(cellmap_cache, tmp_path):
    """Raw is bright exactly inside mitochondria (the fixture's world): in the rendered xy
    section, the gt segments must cover the bright raw pixels, which they do only when both
    layers sit at their true world positions."""
    pytest.importorskip("neuroglancer")
    from PIL import Image

    from dinov3_cache.audit.view import open_viewer

    viewer = open_viewer(cellmap_cache, INDEX)
    webdriver, errors = headless_browser(viewer)
    with webdriver:
        plain_xy_section(viewer)
        raw, gt, both = (shown(viewer, webdriver, names) for names in (["raw"], ["gt"], ["raw", "gt"]))
    assert not errors, errors
    bright = raw.mean(axis=-1) > 128
    labelled = gt.max(axis=-1) > 0
    for name, image in (("raw", raw), ("gt", gt), ("both", both)):
        Image.fromarray(image).save(tmp_path.parent / f"view_{name}.png")
    assert 0.05 < bright.mean() < 0.95 and labelled.any()
    # gt is 128 nm voxels on 32 nm raw: most labelled pixels are bright; moved 96 nm, far fewer
    on_raw = float(bright[labelled].mean())
    shifted = float(np.roll(bright, 24, axis=1)[labelled].mean())
    assert on_raw > 0.7 and on_raw > shifted + 0.1, (on_raw, shifted)
    if os.environ.get("DINOV3_WRITE_DOCS_SCREENSHOT"):
        Image.fromarray(both).resize((384, 384)).save(SCREENSHOT, optimize=True)
    shutil.rmtree(tmp_path, ignore_errors=True)


def state_layers(cache: Path, state_file: Path, *extra: str) -> tuple[dict, str]:
    result = call_main("check_preprocessing", "--output-dir", str(cache), "--view", str(INDEX), "--view-state", str(state_file), *extra, check=True)
    return {layer["name"]: layer for layer in json.loads(state_file.read_text())["layers"]}, result.stdout


def world_placement(layer: dict) -> tuple[np.ndarray, np.ndarray]:
    """(voxel size, voxel 0 corner) in nm from a state layer's transform."""
    transform = layer["source"]["transform"]
    voxel = np.array([transform["outputDimensions"][a][0] * 1e9 for a in "zyx"])
    return voxel, np.array([row[3] for row in transform["matrix"]]) * voxel


def test_view_state_puts_the_source_crop_on_the_cached_arrays(cellmap_cache, cellmap_root, tmp_path):
    """The source levels' transforms in the state, applied by hand to the level arrays on
    disk, give back the cached gt at every annotated voxel and the raw voxels it was read from."""
    import tensorstore as ts

    layers, stdout = state_layers(cellmap_cache, tmp_path / "state.json", "--data-root", str(cellmap_root))
    assert "note:" not in stdout
    assert {"raw", "gt", "mask", "source raw", "source mito"} <= set(layers) and layers["source mito"]["type"] == "segmentation"
    paths = VolumePaths(cellmap_cache, INDEX)
    record = read_json(paths.metadata)["source_dataset"]
    cached_voxel, cached_corner = world_placement(layers["gt"])
    assert cached_corner == pytest.approx(record["offset_nm"])
    for name, cached in (("source mito", "gt"), ("source raw", "raw")):
        voxel, corner = world_placement(layers[name])
        url = layers[name]["source"]["url"]
        assert url.startswith("zarr://http://127.0.0.1:8001/")
        level = ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": str(cellmap_root / url.split(":8001/")[1])}}).result()
        assert voxel.tolist() == record["levels"][cached.replace("gt", "mito")]["voxel_size_nm"]
        values = np.asarray(ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": str(paths.array(cached))}}).result().read().result())
        cached_voxel = np.array(read_attributes(paths.array(cached))["voxel_size"])
        # the source voxel holding each cached voxel's centre
        index = [np.floor((record["offset_nm"][a] + (np.arange(values.shape[a]) + 0.5) * cached_voxel[a] - corner[a]) / voxel[a]).astype(int) for a in range(3)]
        if cached == "gt":  # the window may reach past the labels (GT extension): the mask says where
            index = [np.clip(i, 0, n - 1) for i, n in zip(index, level.shape)]
            source = np.asarray(level.oindex[tuple(index)].read().result())
            annotated = np.asarray(ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": str(paths.array("mask"))}}).result().read().result()) == 1
            assert annotated.mean() > 0.3 and np.array_equal(source[annotated], values[annotated])
        else:  # raw at its own resolution: the level's voxels are the cached ones
            assert voxel.tolist() == cached_voxel.tolist()
            assert np.array_equal(np.asarray(level.oindex[tuple(index)].read().result()), values)


@pytest.mark.parametrize("root", ["missing", "s3://bucket/data"])
def test_unreachable_source_is_one_note_and_the_cached_volume_alone(cellmap_cache, tmp_path, root):
    pytest.importorskip("boto3") if root.startswith("s3") else None
    root = str(tmp_path / root) if root == "missing" else root
    layers, stdout = state_layers(cellmap_cache, tmp_path / "state.json", "--data-root", root, "--s3-endpoint", "http://127.0.0.1:9")
    notes = [line for line in stdout.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "cached volume alone" in notes[0], stdout
    assert set(layers) == {"raw", "gt", "mask"}


@pytest.mark.skipif(not chromium_available(), reason="needs Debian's chromium and chromium-driver (.ci/run installs them)")
def test_source_labels_land_on_cached_gt_in_a_real_browser(cellmap_cache, cellmap_root, tmp_path):
    """The source crop read from --data-root, rendered: its labels cover the cached gt's
    pixels (and far fewer when moved by 96 nm), in the same browser check as above."""
    import argparse

    pytest.importorskip("neuroglancer")
    from dinov3_cache.audit.view import open_viewer
    from dinov3_cache.audit.view_source import reachable_source_layers

    options = argparse.Namespace(data_root=str(cellmap_root), catalog=None, s3_endpoint=None, num_threads=2)
    layers, _ = reachable_source_layers(cellmap_cache, INDEX, options)
    assert sorted(layer.name for layer in layers) == ["source mito", "source raw"]
    viewer = open_viewer(cellmap_cache, INDEX, source=layers)
    webdriver, errors = headless_browser(viewer)
    with webdriver:
        plain_xy_section(viewer)
        gt, source_labels, source_raw = (shown(viewer, webdriver, [n]) for n in ("gt", "source mito", "source raw"))
    assert not errors, errors
    labelled, source_labelled = gt.max(axis=-1) > 0, source_labels.max(axis=-1) > 0
    assert labelled.mean() > 0.02 and source_labelled.any() and (source_raw.mean(axis=-1) > 128).any()
    on_gt = float(source_labelled[labelled].mean())
    shifted = float(np.roll(source_labelled, 24, axis=1)[labelled].mean())
    # 128 nm gt on 64 nm source labels differs only along boundaries (0.87 measured); moved: 0.5
    assert on_gt > 0.8 and on_gt > shifted + 0.2, (on_gt, shifted)
