"""check_preprocessing.py --view: a cached CellMap volume in neuroglancer, in world nm, checked
in a real headless Chromium; the state file (--view-state) loaded as is into the same browser,
its source levels in zarr, N5 and on an S3-compatible server; the axis-naming attributes every
array carries."""

from __future__ import annotations

import contextlib
import functools
import http.server
import io
import json
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import cellmap_data as data
import numpy as np
import pytest
from conftest import TINY_GEOMETRY_ARGS, call_main, run_script, s3_server_holding

from dinov3_cache.audit.view import SOURCE_BASE_URL, STATE_BASE_URL, state_layer
from dinov3_cache.paths import VolumePaths
from dinov3_cache.records import read_json
from dinov3_cache.sources.cellmap import Level, LevelArray, Multiscale, Storage
from dinov3_cache.sources.cellmap.viewer_layers import LevelLayer, stored_dimensions
from dinov3_cache.sources.viewer import SourceOrigin, StoredDimensions
from dinov3_cache.zarr_arrays import open_array, read_attributes

INDEX = 1
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "neuroglancer_view.png"
GAMMA_CORNER = (100.0, 40.0, 0.0)  # off the origin and different on each axis: a lost translation or axis shows
BUCKET_ROOT = "s3://cellmap-test/data"  # where s3_server_holding puts the datasets


@pytest.fixture(autouse=True)
def no_ambient_source(monkeypatch):
    for name in ("DINOV3_DATA_ROOT", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)


def cached_volume(root: Path, out: Path, model: Path, *extra: str) -> Path:
    """One volume (raw saved) built from root by the real CLI."""
    run_script(
        "preprocess_volume.py", "--volume-index", str(INDEX), "--output-dir", str(out), "--model-id", str(model),
        *TINY_GEOMETRY_ARGS, "--data-root", str(root), "--save-raw", *extra, check=True, env={"DINOV3_DATA_ROOT": ""},
    )
    return out


@pytest.fixture(scope="module")
def cellmap_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cellmap") / "data"
    data.build_alpha(root)
    return root


@pytest.fixture(scope="module")
def cellmap_cache(cellmap_root, tmp_path_factory, tiny_model_dir) -> Path:
    """alpha's crop2 mito (zarr), raw at 32 nm."""
    return cached_volume(cellmap_root, tmp_path_factory.mktemp("cache"), tiny_model_dir, "--organelles", "mito", "--crop-filter", "crop2")


@pytest.fixture(scope="module")
def gamma_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cellmap_n5") / "data"
    data.build_gamma(root, GAMMA_CORNER)
    return root


@pytest.fixture(scope="module")
def gamma_cache(gamma_root, tmp_path_factory, tiny_model_dir) -> Path:
    """gamma's crop4 cell (N5), raw at 64 nm: gamma's s1, whose voxel i neuroglancer puts at
    2 i (its downsamplingFactors)."""
    return cached_volume(gamma_root, tmp_path_factory.mktemp("cache_n5"), tiny_model_dir, "--organelles", "cell", "--min-resolution-for-raw", "64")


@pytest.fixture(scope="module")
def moto_alpha(cellmap_root) -> Iterator[str]:
    """The endpoint of a real S3-compatible server holding alpha under BUCKET_ROOT."""
    pytest.importorskip("boto3")
    if shutil.which("moto_server") is None:
        pytest.skip("needs moto_server (pip install 'moto[server]')")
    with s3_server_holding(cellmap_root, "jrc_alpha") as endpoint:
        yield endpoint


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


SCREENSHOT_SECONDS = 90  # neuroglancer answers once every chunk in view is drawn; a stalled page is reloaded


def screenshot(viewer, webdriver, size=(512, 512)) -> np.ndarray:
    """neuroglancer's sync + screenshot, each wait bounded (theirs wait forever on a page that
    stalls): a page that does not answer is reloaded, twice at most."""
    from PIL import Image

    for _ in range(3):
        reply = synced_screenshot(viewer, list(size))
        if reply is not None:
            return np.asarray(Image.open(io.BytesIO(reply.screenshot.image)).convert("RGB"))
        webdriver.reload_browser()
    pytest.fail(f"the viewer page answered no screenshot request within {SCREENSHOT_SECONDS} s, three times")


def synced_screenshot(viewer, size: list[int]):
    """A screenshot of the viewer's current state at `size` (as Webdriver.sync, then
    Viewer.screenshot); None when the page stops answering."""
    deadline = time.monotonic() + SCREENSHOT_SECONDS
    while True:
        reply = screenshot_reply(viewer, None, deadline)
        if reply is None:
            return None
        if reply.viewer_state == viewer.state:
            break
        time.sleep(0.1)
    while True:  # the page may take a request or two to take the size
        reply = screenshot_reply(viewer, size, deadline)
        if reply is None or (reply.screenshot.width, reply.screenshot.height) == tuple(size):
            return reply


def screenshot_reply(viewer, size: list[int] | None, deadline: float):
    prior = viewer.config_state.state
    if size is not None:
        with viewer.config_state.txn() as s:
            s.show_ui_controls, s.show_panel_borders, s.viewer_size = False, False, size
    answered, replies = threading.Event(), []
    try:
        viewer.async_screenshot(lambda reply: (replies.append(reply), answered.set()))
        answered.wait(max(0.0, deadline - time.monotonic()))
    finally:
        if size is not None:
            viewer.config_state.set_state(prior)
    return replies[0] if replies else None


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


def most_labelled_z_nm(cache: Path) -> float:
    """World z (nm) in the gt slice with the most labelled voxels, at the centre of its first raw
    voxel: an x-y section there shows the labels (the crop's middle slice may hold few) and cuts
    no layer on a voxel boundary (where layers of equal voxels may each show another slice)."""
    paths = VolumePaths(cache, INDEX)
    gt, attributes = np.asarray(open_array(paths.array("gt")).read().result()), read_attributes(paths.array("gt"))
    k = int(np.argmax((gt > 0).mean(axis=(1, 2))))
    raw_voxel = read_attributes(paths.array("raw"))["voxel_size"][0]
    return attributes["offset"][0] + k * attributes["voxel_size"][0] + raw_voxel / 2


def plain_xy_section(viewer, unit_nm: float = 32.0, z_nm: float | None = None) -> None:
    """One black-backed section, at world z z_nm when given; unit_nm: the viewer's global voxel
    (--view: the finest array's; the global dimensions are x, y, z)."""
    with viewer.txn() as s:
        if z_nm is not None:
            s.position = [*s.position[:2], z_nm / unit_nm]
        s.layout = "xy"
        s.show_axis_lines = False
        s.show_scale_bar = False
        s.cross_section_background_color = "#000000"
        s.cross_section_scale = 2048 / 512 / unit_nm  # the 2048 nm crop fills 512 px


def layer_bounds(image: np.ndarray) -> np.ndarray:
    """The yellow lines neuroglancer draws along a layer's bounds where they are in view: not data."""
    return (image[..., 0] > 200) & (image[..., 1] > 200) & (image[..., 2] < 80)


def bright(image: np.ndarray) -> np.ndarray:
    return (image.mean(axis=-1) > 128) & ~layer_bounds(image)


def labelled(image: np.ndarray) -> np.ndarray:
    return (image.max(axis=-1) > 0) & ~layer_bounds(image)


def coverage(under: np.ndarray, over: np.ndarray) -> tuple[float, float]:
    """The share of the under mask's pixels the over mask covers, as rendered and moved by
    24 px (96 nm); the outer 8 px are left out (a state's layers draw their bounds there)."""
    inner = (slice(8, -8), slice(8, -8))
    under, moved, over = under[inner], np.roll(over, 24, axis=1)[inner], over[inner]
    return float(over[under].mean()), float(moved[under].mean())


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
        plain_xy_section(viewer, z_nm=most_labelled_z_nm(cellmap_cache))
        raw, gt, both = (shown(viewer, webdriver, names) for names in (["raw"], ["gt"], ["raw", "gt"]))
    assert not errors, errors
    for name, image in (("raw", raw), ("gt", gt), ("both", both)):
        Image.fromarray(image).save(tmp_path.parent / f"view_{name}.png")
    assert 0.05 < bright(raw).mean() < 0.95 and labelled(gt).any()
    # gt is 128 nm voxels on 32 nm raw: most labelled pixels are bright; moved 96 nm, far fewer
    on_raw, shifted = coverage(labelled(gt), bright(raw))
    assert on_raw > 0.7 and on_raw > shifted + 0.1, (on_raw, shifted)
    shutil.rmtree(tmp_path, ignore_errors=True)


def state_layers(cache: Path, state_file: Path, *extra: str) -> tuple[dict, str]:
    result = call_main("check_preprocessing", "--output-dir", str(cache), "--view", str(INDEX), "--view-state", str(state_file), *extra, check=True)
    return {layer["name"]: layer for layer in json.loads(state_file.read_text())["layers"]}, result.stdout


def world_placement(layer: dict) -> tuple[np.ndarray, np.ndarray]:
    """(voxel size, voxel 0 corner) in nm, z, y, x, from a state layer's transform (its rows
    follow its output dimensions, in the source's order)."""
    transform = layer["source"]["transform"]
    voxel = {a: unit[0] * 1e9 for a, unit in transform["outputDimensions"].items()}
    corner = {a: row[3] * voxel[a] for a, row in zip(transform["outputDimensions"], transform["matrix"])}
    return np.array([voxel[a] for a in "zyx"]), np.array([corner[a] for a in "zyx"])


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
        plain_xy_section(viewer, z_nm=most_labelled_z_nm(cellmap_cache))
        gt, source_labels, source_raw = (shown(viewer, webdriver, [n]) for n in ("gt", "source mito", "source raw"))
    assert not errors, errors
    assert labelled(gt).mean() > 0.02 and labelled(source_labels).any() and bright(source_raw).any()
    on_gt, shifted = coverage(labelled(gt), labelled(source_labels))
    # 128 nm gt on 64 nm source labels differs only along boundaries (0.87 measured); moved: 0.5
    assert on_gt > 0.8 and on_gt > shifted + 0.2, (on_gt, shifted)


def level_layer(url: str, driver: str = "zarr") -> LevelLayer:
    """A source layer on level s0 of the multiscale at url (nothing opened)."""
    level = Level("s0", (8.0, 8.0, 8.0), (4.0, 4.0, 4.0))
    return LevelLayer("source raw", "image", LevelArray(Multiscale(url, driver, (level,), (0, 1, 2)), level, False, None), (0, 0, 0), (1, 1, 1))


def test_state_urls_of_s3_levels_name_the_endpoint_when_given():
    layer = level_layer("s3://bucket/data/raw")
    assert layer.state_url(SourceOrigin("s3://bucket/data"), "http://h:8001") == "zarr://s3://bucket/data/raw/s0"
    # path-style on the server the levels were read through, in any format neuroglancer reads
    assert layer.state_url(SourceOrigin("s3://bucket/data", "https://minio.lab:9000/"), "") == "zarr://https://minio.lab:9000/bucket/data/raw/s0"
    assert level_layer("s3://bucket/a.n5/raw", "n5").state_url(SourceOrigin(None, "http://127.0.0.1:9000"), "") == "n5://http://127.0.0.1:9000/bucket/a.n5/raw/s0"
    assert level_layer("/data/raw", "zarr3").state_url(SourceOrigin("/data"), "http://h:8001") == "zarr3://http://h:8001/raw/s0"
    assert level_layer("/elsewhere/raw").state_url(SourceOrigin("/data"), "http://h:8001") is None


def test_zarr_levels_stored_in_another_axis_order_keep_neuroglancer_names(tmp_path):
    """A zarr level stored x, y, z: its dimensions keep their stored order and the names
    neuroglancer gives them (`_ARRAY_DIMENSIONS`, else d0, d1, d2)."""
    level = Level("s0", (8.0, 8.0, 8.0), (4.0, 4.0, 4.0))
    array = LevelArray(Multiscale(str(tmp_path / "raw"), "zarr", (level,), (2, 1, 0)), level, False, None)
    assert stored_dimensions(array, Storage()) == StoredDimensions(("d0", "d1", "d2"), (2, 1, 0))
    (tmp_path / "raw" / "s0").mkdir(parents=True)
    (tmp_path / "raw" / "s0" / ".zattrs").write_text(json.dumps({"_ARRAY_DIMENSIONS": ["x", "y", "z"]}))
    dimensions = stored_dimensions(array, Storage())
    assert dimensions == StoredDimensions(("x", "y", "z"), (2, 1, 0))
    transform = state_layer("image", "raw", "zarr://u", [40.0, 8.0, 4.0], [400.0, 80.0, 40.0], dimensions)["source"]["transform"]
    assert transform["inputDimensions"] == transform["outputDimensions"] == {"x": [4e-9, "m"], "y": [8e-9, "m"], "z": [4e-8, "m"]}
    assert [row[3] for row in transform["matrix"]] == [10.0, 10.0, 10.0]


def test_view_state_writes_n5_levels_as_neuroglancer_reads_them(gamma_cache, gamma_root, tmp_path):
    """neuroglancer names an N5 level's dimensions x, y, z (its `axes`, stored fastest first)
    and puts voxel i of gamma's raw s1 at 2 i (its downsamplingFactors): the written input
    dimensions say so, and the output places each level at its world corner."""
    layers, stdout = state_layers(gamma_cache, tmp_path / "state.json", "--data-root", str(gamma_root))
    assert "note:" not in stdout and {"source raw", "source cell"} <= set(layers)
    for name, voxel, step in (("source raw", 64.0, 2.0), ("source cell", 128.0, 1.0)):
        source = layers[name]["source"]
        assert source["url"].startswith("n5://http://127.0.0.1:8001/jrc_gamma/jrc_gamma.n5/recon-1/")
        assert source["transform"]["inputDimensions"] == {a: [voxel / step * 1e-9, "m"] for a in "xyz"}
        assert list(source["transform"]["outputDimensions"]) == ["x", "y", "z"]
        assert [v.tolist() for v in world_placement(layers[name])] == [[voxel] * 3, list(GAMMA_CORNER)]


def test_view_state_with_an_s3_endpoint_reads_the_levels_from_it(cellmap_cache, cellmap_root, moto_alpha, tmp_path):
    """The same state as from the local copy of the data, but for the URLs: path-style on the
    --s3-endpoint server."""
    local, _ = state_layers(cellmap_cache, tmp_path / "local.json", "--data-root", str(cellmap_root))
    remote, stdout = state_layers(cellmap_cache, tmp_path / "s3.json", "--data-root", BUCKET_ROOT, "--s3-endpoint", moto_alpha)
    assert "note:" not in stdout and set(remote) == set(local) and {"source raw", "source mito"} <= set(remote)
    for name, layer in local.items():
        if name.startswith("source "):
            url = layer["source"]["url"].replace(SOURCE_BASE_URL.format(host="127.0.0.1"), f"{moto_alpha}/cellmap-test/data")
            layer = {**layer, "source": {**layer["source"], "url": url}}
        assert remote[name] == layer


class CorsFiles(http.server.SimpleHTTPRequestHandler):
    """A directory's files, readable from any page (CORS), as a neuroglancer the user runs needs."""

    def end_headers(self):
        self.send_header("Access-Control-Allow-Origin", "*")
        super().end_headers()

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def served(directory: Path) -> Iterator[str]:
    """directory over HTTP on a free port of 127.0.0.1; yields its base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(CorsFiles, directory=str(directory)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def rendered_state(state: dict, names: list[str], unit_nm: float, z_nm: float | None = None) -> dict[str, np.ndarray]:
    """The state loaded as is into neuroglancer in headless Chromium: the named layers, one at a time."""
    import neuroglancer

    viewer = neuroglancer.Viewer()
    viewer.set_state(neuroglancer.ViewerState(state))
    webdriver, errors = headless_browser(viewer)
    with webdriver:
        plain_xy_section(viewer, unit_nm, z_nm)
        images = {name: shown(viewer, webdriver, [name]) for name in names}
    assert not errors, errors
    return images


# case: the cache, where its source is (a data root, or an S3 server's endpoint) and its label layer
STATE_SOURCES = {
    "zarr": ("cellmap_cache", "cellmap_root", "source mito"),
    "n5": ("gamma_cache", "gamma_root", "source cell"),
    "s3-endpoint": ("cellmap_cache", "moto_alpha", "source mito"),
}


@pytest.mark.skipif(not chromium_available(), reason="needs Debian's chromium and chromium-driver (.ci/run installs them)")
@pytest.mark.parametrize("case", STATE_SOURCES)
def test_state_file_puts_the_source_on_the_cached_arrays_in_a_real_browser(case, request, tmp_path):
    """The written state, served where it says (the cache and a local data root over HTTP,
    S3 levels from the server), rendered by neuroglancer: the source raw, read at the cached
    raw's own level, covers the cached raw's bright pixels, and far fewer when moved by 96 nm;
    the source labels cover the cached gt."""
    pytest.importorskip("neuroglancer")
    cache_fixture, source_fixture, labels = STATE_SOURCES[case]
    cache, source = request.getfixturevalue(cache_fixture), request.getfixturevalue(source_fixture)
    host = "127.0.0.1"
    with contextlib.ExitStack() as stack:
        replace = {STATE_BASE_URL.format(host=host): stack.enter_context(served(cache))}
        if case == "s3-endpoint":
            options = ["--data-root", BUCKET_ROOT, "--s3-endpoint", source]
        else:
            options = ["--data-root", str(source)]
            replace[SOURCE_BASE_URL.format(host=host)] = stack.enter_context(served(source))
        state_file = tmp_path / "state.json"
        call_main("check_preprocessing", "--output-dir", str(cache), "--view", str(INDEX), "--view-state", str(state_file), *options, check=True)
        text = functools.reduce(lambda t, pair: t.replace(*pair), replace.items(), state_file.read_text())
        gt_voxel = read_attributes(VolumePaths(cache, INDEX).array("gt"))["voxel_size"][0]
        images = rendered_state(json.loads(text), ["raw", "source raw", "gt", labels], gt_voxel, most_labelled_z_nm(cache))
    assert 0.02 < bright(images["raw"]).mean() < 0.95 and labelled(images["gt"]).mean() > 0.02
    on_raw, shifted = coverage(bright(images["raw"]), bright(images["source raw"]))
    assert on_raw > 0.95 and on_raw > shifted + 0.2, (on_raw, shifted)
    # gamma's cells are large: a 96 nm move uncovers little of them
    on_gt, shifted = coverage(labelled(images["gt"]), labelled(images[labels]))
    assert on_gt > 0.8 and on_gt > shifted, (on_gt, shifted)


# --------------------------------------------------------------------------- the view as it opens

OPENED_SIZE = (800, 800)  # 4 panels of 400 px (view.PANEL_PIXELS): "xy" is the top left one
MAGENTA, BLACK = "#ff00ff", "#000000"


def patterned_copy(cache: Path, tmp_path: Path) -> Path:
    """A copy of the cache whose raw is bright only where x < 1/3, y < 2/3 and z >= 1/3 of the
    crop (so each plane through the centre looks different: xy a corner, xz a band, yz dark)
    and whose mask is 0 (labels not valid) where y < 1/2."""
    import tensorstore as ts

    copy = tmp_path / "cache"
    shutil.copytree(cache, copy)
    paths = VolumePaths(copy, INDEX)
    for name in ("raw", "mask"):
        store = ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": str(paths.array(name))}}).result()
        d, h, w = store.shape
        z, y, x = np.meshgrid(np.arange(d), np.arange(h), np.arange(w), indexing="ij")
        if name == "raw":
            values = np.where((x < w / 3) & (y < 2 * h / 3) & (z >= d / 3), 255, 40)
        else:
            values = (y >= h / 2).astype(np.uint8)
        store.write(values.astype(store.dtype.numpy_dtype)).result()
    return copy


def opened_view_images(viewer, webdriver, names: list[str]) -> dict[str, np.ndarray]:
    """The xy panel (top left of the 4-panel layout) of the view as it opens, each named layer
    alone at full opacity; raw on a magenta background (the volume's extent shows), the
    others on black."""
    import neuroglancer

    images = {}
    for name in names:
        with viewer.txn() as s:
            s.show_axis_lines, s.show_scale_bar = False, False
            s.cross_section_background_color = MAGENTA if name == "raw" else BLACK
            for layer in s.layers:
                layer.visible = layer.name == name
                if isinstance(layer.layer, neuroglancer.ImageLayer):
                    layer.layer.opacity = 1.0
        image = screenshot(viewer, webdriver, OPENED_SIZE)
        images[name] = image[: OPENED_SIZE[1] // 2, : OPENED_SIZE[0] // 2]
    return images


def volume_box(raw_panel: np.ndarray) -> tuple[np.ndarray, tuple[slice, slice]]:
    """The pixels the volume covers (not the magenta background) and their bounding box."""
    covered = ~((raw_panel[..., 0] > 200) & (raw_panel[..., 1] < 60) & (raw_panel[..., 2] > 200))
    rows, cols = np.nonzero(covered)
    return covered, (slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1))


def relative_grid(box: tuple[slice, slice]) -> tuple[np.ndarray, np.ndarray]:
    """(u, v) in [0, 1) across the box: u along the panel's width, v down its height."""
    h, w = box[0].stop - box[0].start, box[1].stop - box[1].start
    v, u = np.meshgrid((np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w, indexing="ij")
    return u, v


def assert_opened_on_the_xy_plane(images: dict[str, np.ndarray]) -> None:
    """The crop fills most of the xy panel, which shows x across and y down at a z in the
    crop's bright third (the raw pattern's corner), and the mask shades where it is 0."""
    covered, box = volume_box(images["raw"])
    assert covered.mean() > 0.5, covered.mean()  # 0.81 when the crop spans 90 % of the panel
    u, v = relative_grid(box)
    bright = images["raw"][box][..., 1] > 128
    assert (bright == ((u < 1 / 3) & (v < 2 / 3))).mean() > 0.95, (bright.mean(), box)
    shaded = images["mask"][box][..., 2] > 30
    assert (shaded == (v < 1 / 2)).mean() > 0.95, shaded.mean()  # inside and outside the mask differ


def assert_renders_features(image: np.ndarray, box: tuple[slice, slice]) -> None:
    features = image[box].reshape(-1, 3)
    assert len(np.unique(features, axis=0)) > 20 and features.std(axis=0).max() > 10


@pytest.mark.skipif(not chromium_available(), reason="needs Debian's chromium and chromium-driver (.ci/run installs them)")
def test_view_opens_on_the_xy_plane_of_the_volume_with_the_mask_shaded_in_a_real_browser(cellmap_cache, tmp_path):
    """--view as it opens: the crop fills most of the "xy" panel, which shows the x-y plane;
    the mask's shader compiles (no console error) and shades where labels are not valid; the
    features render as RGB."""
    pytest.importorskip("neuroglancer")
    from PIL import Image

    from dinov3_cache.audit.view import open_viewer

    if os.environ.get("DINOV3_WRITE_DOCS_SCREENSHOT"):  # the real crop as it opens, every layer shown at start
        viewer = open_viewer(cellmap_cache, INDEX)
        webdriver, errors = headless_browser(viewer)
        with webdriver:
            Image.fromarray(screenshot(viewer, webdriver, OPENED_SIZE)).resize((512, 512)).save(SCREENSHOT, optimize=True)
        assert not errors, errors
    viewer = open_viewer(patterned_copy(cellmap_cache, tmp_path), INDEX)
    webdriver, errors = headless_browser(viewer)
    with webdriver:
        images = opened_view_images(viewer, webdriver, ["raw", "mask", "features"])
    assert not errors, errors
    assert_opened_on_the_xy_plane(images)
    assert_renders_features(images["features"], volume_box(images["raw"])[1])


@pytest.mark.skipif(not chromium_available(), reason="needs Debian's chromium and chromium-driver (.ci/run installs them)")
def test_state_file_opens_on_the_xy_plane_with_features_and_mask_in_a_real_browser(cellmap_cache, tmp_path):
    """--view-state --view-features, loaded as is with the cache served over HTTP: the same
    opening view as --view, the mask shaded by its shader, and a features layer read from the
    RGB preview written beside the volume that renders (non-uniform pixels)."""
    import neuroglancer

    cache = patterned_copy(cellmap_cache, tmp_path)
    state_file = tmp_path / "state.json"
    call_main("check_preprocessing", "--output-dir", str(cache), "--view", str(INDEX), "--view-state", str(state_file), "--view-features", check=True)
    with served(cache) as base:
        state = json.loads(state_file.read_text().replace(STATE_BASE_URL.format(host="127.0.0.1"), base))
        viewer = neuroglancer.Viewer()
        viewer.set_state(neuroglancer.ViewerState(state))
        webdriver, errors = headless_browser(viewer)
        with webdriver:
            images = opened_view_images(viewer, webdriver, ["raw", "mask", "features"])
    assert not errors, errors
    assert_opened_on_the_xy_plane(images)
    assert_renders_features(images["features"], volume_box(images["raw"])[1])


def test_features_preview_is_beside_the_volume_and_not_debris(cellmap_cache, tmp_path):
    """--view-features writes OUT/volume_XXXXXX_preview.zarr: uint8 RGB on the features' grid,
    referenced by the state; the audit still reports the volume complete with no debris, and
    --remove-debris leaves the preview alone."""
    from dinov3_cache.audit.view import features_preview_path

    cache = tmp_path / "cache"
    shutil.copytree(cellmap_cache, cache)
    layers, _ = state_layers(cache, tmp_path / "state.json", "--view-features")
    preview = features_preview_path(cache, INDEX)
    assert layers["features"]["source"]["url"].endswith("/" + preview.name) and "getDataValue(2)" in layers["features"]["shader"]
    attributes, features = read_attributes(preview), read_attributes(VolumePaths(cache, INDEX).array("features"))
    assert attributes["voxel_size"] == features["voxel_size"] and attributes["offset"] == features["offset"]
    assert attributes["_ARRAY_DIMENSIONS"] == ["c", "z", "y", "x"]
    assert list(layers["features"]["source"]["transform"]["outputDimensions"]) == ["c^", "z", "y", "x"]
    text = call_main("check_preprocessing", "--output-dir", str(cache), "--indices", str(INDEX), "--json").stdout
    report = json.loads(text)
    assert report["complete"] == [INDEX] and report["exit_status"] == 0 and preview.name not in text, report  # not listed as debris
    removed = call_main("check_preprocessing", "--output-dir", str(cache), "--remove-debris", check=True)
    assert "removed 0 debris entries" in removed.stdout and preview.is_dir()


def test_features_of_a_tokens_volume_are_built_for_the_view(tmp_path, tiny_model_dir):
    """A tokens volume has no features array: the viewer's RGB (and the state's preview) is built
    from its tokens, on the label grid."""
    from conftest import preprocess_args

    from dinov3_cache.audit.view import features_rgb, write_features_preview

    call_main("preprocess_volume", *preprocess_args(tmp_path, INDEX, tiny_model_dir, "--layout", "tokens"), check=True)
    rgb, attributes = features_rgb(tmp_path, INDEX)
    gt = read_attributes(VolumePaths(tmp_path, INDEX).array("gt"))
    assert rgb.dtype == np.uint8 and rgb.shape == (3, 16, 16, 16) and attributes["voxel_size"] == gt["voxel_size"]
    assert len(np.unique(rgb.reshape(3, -1).T, axis=0)) > 20  # varied colours
    preview = open_array(write_features_preview(tmp_path, INDEX)).read().result()
    assert np.array_equal(preview, rgb)
