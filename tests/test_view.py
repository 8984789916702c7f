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
def cellmap_cache(tmp_path_factory, tiny_model_dir) -> Path:
    """One volume of alpha's crop2 mito (raw saved) built by the real CLI."""
    root = tmp_path_factory.mktemp("cellmap") / "data"
    data.build_alpha(root)
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


@pytest.mark.skipif(not chromium_available(), reason="needs Debian's chromium and chromium-driver (.ci/run installs them)")
def test_gt_lands_on_raw_in_a_real_browser(cellmap_cache, tmp_path):
    """Raw is bright exactly inside mitochondria (the fixture's world): in the rendered xy
    section, the gt segments must cover the bright raw pixels, which they do only when both
    layers sit at their true world positions."""
    pytest.importorskip("neuroglancer")
    import neuroglancer.webdriver
    from PIL import Image

    from dinov3_cache.audit.view import open_viewer

    viewer = open_viewer(cellmap_cache, INDEX)
    webdriver = neuroglancer.webdriver.Webdriver(
        viewer, headless=True, browser="chrome", docker=os.geteuid() == 0,  # root: no sandbox
        browser_binary_path=CHROMIUM, window_size=(700, 700), print_logs=False,
    )
    errors = []
    webdriver.add_log_listener(lambda log: errors.append(log.text) if log.level == "error" else None)
    with webdriver:
        with viewer.txn() as s:
            s.layout = "xy"
            s.show_axis_lines = False
            s.show_scale_bar = False
            s.cross_section_background_color = "#000000"
            s.cross_section_scale = 2048 / 512 / 32  # the 2048 nm crop fills 512 px (in units of the 32 nm raw voxel)
            for layer in s.layers:
                layer.visible = layer.name == "raw"
        raw = screenshot(viewer, webdriver)
        with viewer.txn() as s:
            for layer in s.layers:
                layer.visible = layer.name == "gt"
        gt = screenshot(viewer, webdriver)
        with viewer.txn() as s:
            for layer in s.layers:
                layer.visible = layer.name in ("raw", "gt")
        both = screenshot(viewer, webdriver)
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
