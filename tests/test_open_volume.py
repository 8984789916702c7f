"""dinov3_cache.open_volume: a cached volume as an xarray.Dataset, for dense and tokens volumes,
zarr v2 and v3, with and without raw and mask, and augmented: values against TensorStore's,
coordinates against the metadata's offsets and world transform, stored dtypes kept."""

from __future__ import annotations

import sys
from pathlib import Path

import cellmap_data
import numpy as np
import pytest
from conftest import TINY_GEOMETRY_ARGS, call_main, preprocess_args

import dinov3_cache
from dinov3_cache.paths import VolumePaths
from dinov3_cache.records import read_json
from dinov3_cache.xarray_view import OpenVolumeError
from dinov3_cache.zarr_arrays import open_array, read_attributes

xarray = pytest.importorskip("xarray")

INDEX = 0
# name: (extra extraction options, the variables the volume has)
CASES = {
    "dense-v2-raw-mask": (["--save-raw"], {"features", "gt", "mask", "raw"}),
    "dense-v3-bare": (["--zarr-format", "3", "--no-gt-extension"], {"features", "gt"}),
    "tokens-v2-bare": (["--layout", "tokens", "--no-gt-extension"], {"features", "gt"}),
    "tokens-v3-raw-mask": (["--layout", "tokens", "--zarr-format", "3", "--save-raw"], {"features", "gt", "mask", "raw"}),
    # a CellMap crop (synthetic volumes are never augmented); volume 0's draw transposes and flips
    "dense-v2-augmented": (["--save-raw", "--augment", "--organelles", "mito", "--crop-filter", "crop2"], {"features", "gt", "mask", "raw"}),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory, tiny_model_dir) -> tuple[Path, set[str], str]:
    extra, variables = CASES[request.param]
    out = tmp_path_factory.mktemp(request.param)
    if request.param.endswith("augmented"):
        root = tmp_path_factory.mktemp("cellmap") / "data"
        cellmap_data.build_alpha(root)
        options = ["--volume-index", str(INDEX), "--output-dir", str(out), "--model-id", str(tiny_model_dir), "--data-root", str(root)]
        call_main("preprocess_volume", *options, *TINY_GEOMETRY_ARGS, *extra, check=True)
    else:
        call_main("preprocess_volume", *preprocess_args(out, INDEX, tiny_model_dir, *extra), check=True)
    return out, variables, request.param


def stored(cache: Path, name: str) -> np.ndarray:
    return np.asarray(open_array(VolumePaths(cache, INDEX).array(name)).read().result())


def test_every_array_is_a_variable_with_the_stored_values_and_dtype(case):
    cache, variables, name = case
    ds = dinov3_cache.open_volume(cache, INDEX)
    assert set(ds.data_vars) == variables
    assert not ds["features"].variable._in_memory  # lazy: nothing is read until asked for
    for variable in variables - {"features"} | ({"features"} if not name.startswith("tokens") else set()):
        expected = stored(cache, variable)
        values = ds[variable].values
        assert values.dtype == expected.dtype and np.array_equal(values, expected), variable
    assert ds["gt"].dtype.kind == "u"  # no CF decoding: the fill value 0 stays 0, not NaN
    assert ds["features"].dims == ("c", "z", "y", "x") or name.endswith("augmented")
    if "raw" in variables:
        assert {d.removesuffix("_raw") for d in ds["raw"].dims} == {"z", "y", "x"} and all(d.endswith("_raw") for d in ds["raw"].dims)
        assert ds.sizes["z_raw"] == 4 * ds.sizes["z"]  # 32 nm raw beside 128 nm labels, each on its own grid


def test_coordinates_are_voxel_centres_at_the_metadata_offsets(case):
    cache, variables, name = case
    metadata = read_json(VolumePaths(cache, INDEX).metadata)
    offset = metadata["source_dataset"]["offset_nm"]
    transform = metadata["source_dataset"].get("world_transform")
    ds = dinov3_cache.open_volume(cache, INDEX)
    for variable, grid in (("gt", "features"), ("raw", "raw")):
        if variable not in variables:
            continue
        voxel = metadata["configuration"]["voxel_size_nm"][grid]
        for axis, a in zip("zyx", range(3)):
            centres = ds[axis + ("_raw" if variable == "raw" else "")].values
            assert min(centres) - voxel[a] / 2 == pytest.approx(offset[a]) and np.allclose(np.abs(np.diff(centres)), voxel[a])
        if name.endswith("augmented"):
            assert transform["axis_order"] != [0, 1, 2] and any(transform["flip"])
            assert ds[variable].dims == tuple(a + ("_raw" if variable == "raw" else "") for a in ("x", "z", "y"))
        if transform is not None:  # augmented: each stored voxel's coordinates are where affine_nm puts its centre
            affine = np.array(transform["affine_nm"]["labels" if variable == "gt" else "raw"])
            index = np.array([1, 2, 3])
            world = affine @ np.append(index, 1)
            point = ds[variable][tuple(index)]
            assert [float(point[axis + ("_raw" if variable == "raw" else "")]) for axis in "zyx"] == pytest.approx(world[:3])


def test_tokens_features_are_built_from_the_tokens(case):
    cache, _, name = case
    if not name.startswith("tokens"):
        pytest.skip("dense volumes: the stored features are compared above")
    import torch

    from dinov3_cache.extraction.upsampling import features_from_tokens
    from dinov3_cache.schema import load_volume_metadata

    metadata = load_volume_metadata(VolumePaths(cache, INDEX).metadata)
    tokens = stored(cache, "tokens").astype(np.float32)
    whole = features_from_tokens({p: torch.from_numpy(tokens[i]) for i, p in enumerate(metadata.configuration.planes)}, tokens.shape[2]).numpy()
    ds = dinov3_cache.open_volume(cache, INDEX)
    assert ds["features"].dtype == np.float32 and ds["features"].shape == whole.shape
    part = ds["features"].isel(c=[1, 3], z=slice(3, 9), y=slice(1, 14, 3), x=7).values
    assert np.allclose(part, whole[[1, 3], 3:9, 1:14:3, 7], atol=1e-5)
    assert np.allclose(ds["features"].values, whole, atol=1e-5)


def test_features_and_labels_share_the_label_grid(case):
    cache, _, name = case
    ds = dinov3_cache.open_volume(cache, INDEX)
    attributes = read_attributes(VolumePaths(cache, INDEX).array("gt"))
    assert ds["gt"].attrs["voxel_size"] == attributes["voxel_size"]
    assert set(ds["features"].dims[1:]) == set(ds["gt"].dims)


def test_a_missing_volume_or_xarray_is_one_clear_error(case, monkeypatch):
    cache, _, _ = case
    with pytest.raises(OpenVolumeError, match="volume 5 is not complete"):
        dinov3_cache.open_volume(cache, 5)
    monkeypatch.setitem(sys.modules, "xarray", None)
    with pytest.raises(OpenVolumeError, match="pip install xarray"):
        dinov3_cache.open_volume(cache, INDEX)


def test_xarray_alone_cannot_open_a_lone_array(case):
    """What open_volume is for: xarray.open_zarr opens groups, and every cached array stands alone."""
    cache, _, name = case
    if "augmented" in name or name.startswith("tokens"):
        pytest.skip("one dense volume per zarr format is enough")
    with pytest.raises(Exception, match="(?i)group|array"):
        xarray.open_zarr(VolumePaths(cache, INDEX).array("gt"), consolidated=False)
