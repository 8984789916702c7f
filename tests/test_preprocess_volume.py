"""preprocess_volume.py and the core: values, layout, metadata, commit safety, bad input."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, TINY_GEOMETRY_ARGS, call_main, preprocess_args, run_script

from dinov3_cache.paths import VolumePaths
from dinov3_cache.records import read_json
from dinov3_cache.schema import metadata_is_intact
from dinov3_cache.zarr_arrays import open_array

SEED_METADATA_KEYS = {
    "volume_index", "volume_name", "timestamp", "paths", "source_dataset", "shapes",
    "configuration", "timing", "storage", "statistics",
}


def read(path: Path) -> np.ndarray:
    return open_array(path).read().result()


def recompute_features(raw: np.ndarray, model_dir: Path, planes: list[str], out_dim: int) -> np.ndarray:
    """Independent recomputation with transformers + F.interpolate, following the README's recipe."""
    from transformers import DINOv3ViTModel

    model = DINOv3ViTModel.from_pretrained(model_dir).eval()
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    factor = raw.shape[0] // out_dim
    prefix = 1 + model.config.num_register_tokens
    total = 0
    for plane in planes:
        normal = {"xy": 0, "xz": 1, "yz": 2}[plane]
        stack = np.moveaxis(raw.astype(np.float64), normal, 0)
        slices = stack.reshape(out_dim, factor, *stack.shape[1:]).mean(axis=1) / 255.0  # area mean
        pixels = (torch.from_numpy(slices).float()[:, None].expand(-1, 3, -1, -1) - mean) / std
        with torch.no_grad():
            tokens = model(pixel_values=pixels).last_hidden_state[:, prefix:]
        g = raw.shape[0] // 16
        grids = tokens.reshape(out_dim, g, g, -1).permute(0, 3, 1, 2)
        up = F.interpolate(grids, size=(out_dim, out_dim), mode="bilinear", align_corners=False)  # (n, C, a, b)
        volume = up.permute(1, 0, 2, 3).numpy()  # (C, normal, a, b)
        # put the normal axis back in its place among z, y, x
        total = total + np.moveaxis(volume, 1, 1 + normal)
    return total / len(planes)


@pytest.mark.parametrize("planes", [["xy", "xz", "yz"], ["xz"], ["yz", "xy"]])
def test_features_equal_independent_recomputation(tmp_path, tiny_model_dir, planes):
    out = tmp_path / "cache"
    call_main("preprocess_volume", *preprocess_args(out, 5, tiny_model_dir, "--save-raw", "--planes", *planes,
                                                        "--features-dtype", "float32", "--batch-size", "5"), check=True)
    paths = VolumePaths(out, 5)
    raw = read(paths.array("raw"))
    expected = recompute_features(raw, tiny_model_dir, planes, 16)
    features = read(paths.array("features"))
    assert features.shape == expected.shape == (32, 16, 16, 16)
    np.testing.assert_allclose(features, expected, rtol=1e-4, atol=1e-4)


def test_small_blocks_tile_the_volume_exactly(tmp_path, tiny_model_dir, monkeypatch):
    """Blocks smaller than a slab (channel units x tiles x slabs) give the same features."""
    import dinov3_cache.extraction.features as features

    monkeypatch.setattr(features, "BLOCK_BYTES", 1)  # one chunk row per tile
    call_main("preprocess_volume", *preprocess_args(tmp_path, 5, tiny_model_dir, "--save-raw", "--chunks", "16,8,8,8",
                                                    "--features-dtype", "float32", "--batch-size", "3"), check=True)
    paths = VolumePaths(tmp_path, 5)
    expected = recompute_features(read(paths.array("raw")), tiny_model_dir, ["xy", "xz", "yz"], 16)
    np.testing.assert_allclose(read(paths.array("features")), expected, rtol=1e-4, atol=1e-4)


def test_channel_chunk_divides_the_channels(tmp_path, tiny_model_dir):
    """32 channels with 24 asked: chunks of 16 channels, none padded."""
    call_main("preprocess_volume", *preprocess_args(tmp_path, 0, tiny_model_dir, "--chunks", "24,8,8,8"), check=True)
    meta = read_json(VolumePaths(tmp_path, 0).metadata)
    assert meta["configuration"]["chunks"] == [16, 8, 8, 8]
    assert sorted({key.split(".")[0] for key in meta["integrity"]["crc32"]["features"]}) == ["0", "1"]


def test_float16_features_match_within_rounding(built_cache, tiny_model_dir, tmp_path):
    """The default float16 cache equals a float32 run rounded to float16."""
    call_main("preprocess_volume", *preprocess_args(tmp_path, 0, tiny_model_dir, "--features-dtype", "float32"), check=True)
    exact = read(VolumePaths(tmp_path, 0).array("features"))
    half = read(VolumePaths(built_cache, 0).array("features"))
    assert half.dtype == np.float16
    np.testing.assert_allclose(half.astype(np.float32), exact, rtol=2 ** -10, atol=1e-6)


def test_planes_are_averaged(tmp_path, tiny_model_dir):
    per_plane = {}
    for plane in ("xy", "xz", "yz"):
        out = tmp_path / plane
        call_main("preprocess_volume", *preprocess_args(out, 1, tiny_model_dir, "--planes", plane, "--features-dtype", "float32"), check=True)
        per_plane[plane] = read(VolumePaths(out, 1).array("features"))
    out = tmp_path / "all"
    call_main("preprocess_volume", *preprocess_args(out, 1, tiny_model_dir, "--features-dtype", "float32"), check=True)
    averaged = read(VolumePaths(out, 1).array("features"))
    np.testing.assert_allclose(averaged, sum(per_plane.values()) / 3, rtol=1e-5, atol=1e-5)
    assert not np.allclose(per_plane["xy"], per_plane["xz"])


def test_layout_shapes_dtypes_and_metadata(built_cache):
    paths = VolumePaths(built_cache, 0)
    meta = read_json(paths.metadata)
    assert SEED_METADATA_KEYS <= set(meta)
    assert metadata_is_intact(meta)
    assert meta["shapes"]["features"] == [32, 16, 16, 16]
    assert meta["shapes"]["raw"] == [64, 64, 64]
    for name in ("features", "gt", "mask"):
        array = open_array(paths.array(name))
        assert list(array.shape) == meta["shapes"][name]
        assert str(array.dtype.numpy_dtype) == meta["dtypes"][name]
        assert Path(meta["paths"][name]) == paths.array(name).resolve()
    config = meta["configuration"]
    assert config["pretrained"] is True and config["planes"] == ["xy", "xz", "yz"]
    assert config["slice_size"] == 64 and config["patch_size"] == 16
    assert len(config["fingerprint"]) == 16
    timing = meta["timing"]
    assert 0 < timing["feature_extraction_seconds"] <= timing["total_seconds"]
    # storage is measured on disk
    du = sum(f.stat().st_blocks * 512 for f in paths.array("features").rglob("*") if f.is_file())
    assert meta["storage"]["bytes"]["features"] == du
    assert meta["storage"]["features_gb"] == pytest.approx(du / 1e9, abs=1e-6)
    # statistics come from the data
    gt, mask = read(paths.array("gt")), read(paths.array("mask"))
    assert meta["statistics"]["unique_classes"] == sorted(int(v) for v in np.unique(gt[mask > 0]))
    assert meta["statistics"]["valid_gt_fraction"] == pytest.approx(mask.mean())
    features = read(paths.array("features")).astype(np.float64)
    assert meta["statistics"]["features"]["mean"] == pytest.approx(features.mean(), rel=1e-3, abs=1e-3)
    assert meta["statistics"]["features"]["non_finite"] == 0
    # every array carries world-space attributes and the commit id
    attrs = json.loads((paths.array("features") / ".zattrs").read_text())
    assert attrs["voxel_size"] == [128.0] * 3 and attrs["axis_names"][0] == "c^"
    assert attrs["dinov3_cache"]["commit_id"] == meta["integrity"]["commit_id"]
    status = read_json(paths.status)
    assert status["state"] == "complete" and status["host"] and status["finished"]


def test_chunk_checksums_match_data(built_cache):
    from dinov3_cache.zarr_arrays import chunk_key, chunk_slices, crc32_of

    paths = VolumePaths(built_cache, 1)
    meta = read_json(paths.metadata)
    for name in ("features", "gt", "mask"):
        data = read(paths.array(name))
        chunks = meta["integrity"]["chunks"][name]
        recorded = meta["integrity"]["crc32"][name]
        computed = {chunk_key(i): crc32_of(data[s]) for i, s in chunk_slices(data.shape, chunks)}
        assert computed == recorded


@pytest.mark.parametrize("extra", [[], ["--zarr-format", "3", "--compression", "zstd"], ["--compression"]])
def test_zarr_python_reads_every_array(tmp_path, tiny_model_dir, extra):
    import zarr

    call_main("preprocess_volume", *preprocess_args(tmp_path, 2, tiny_model_dir, "--save-raw", *extra), check=True)
    meta = read_json(VolumePaths(tmp_path, 2).metadata)
    if "--compression" in extra and "zstd" not in extra:
        assert meta["configuration"]["compression"] == "lz4"
    for name in ("features", "gt", "mask", "raw"):
        path = VolumePaths(tmp_path, 2).array(name)
        np.testing.assert_array_equal(zarr.open_array(str(path), mode="r")[...], read(path))


def test_bfloat16_features(tmp_path, tiny_model_dir):
    call_main("preprocess_volume", *preprocess_args(tmp_path, 0, tiny_model_dir, "--features-dtype", "bfloat16"), check=True)
    features = read(VolumePaths(tmp_path, 0).array("features"))
    assert features.dtype.name == "bfloat16" and np.isfinite(features.astype(np.float32)).all()


def test_no_gt_extension_writes_no_mask(tmp_path, tiny_model_dir):
    call_main("preprocess_volume", *preprocess_args(tmp_path, 0, tiny_model_dir, "--no-gt-extension"), check=True)
    paths = VolumePaths(tmp_path, 0)
    assert not paths.array("mask").exists()
    assert "mask" not in read_json(paths.metadata)["paths"]


def test_rerun_skips_and_overwrite_replaces(tmp_path, tiny_model_dir):
    args = preprocess_args(tmp_path, 0, tiny_model_dir)
    call_main("preprocess_volume", *args, check=True)
    paths = VolumePaths(tmp_path, 0)
    first = read_json(paths.metadata)
    again = call_main("preprocess_volume", *args, check=True)
    assert "already complete; skipping" in again.stdout
    assert read_json(paths.metadata) == first
    different = call_main("preprocess_volume", *args, "--planes", "xy")
    assert different.returncode == 1 and "different configuration" in different.stderr
    assert read_json(paths.metadata) == first
    call_main("preprocess_volume", *args, "--planes", "xy", "--overwrite", check=True)
    second = read_json(paths.metadata)
    assert second["integrity"]["commit_id"] != first["integrity"]["commit_id"]
    assert second["configuration"]["planes"] == ["xy"]
    assert not paths.staging.exists()


def slow_args(out: Path, model_dir: Path, *extra: str) -> list[str]:
    """A run long enough to be caught mid-way (output 64, slice 256, one slice per forward)."""
    args = preprocess_args(out, 0, model_dir, *extra, "--batch-size", "1")
    args[args.index("--output-image-dim") + 1] = "64"
    return args


def start_slow_run(out: Path, model_dir: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(REPO / "preprocess_volume.py"), *slow_args(out, model_dir, *extra)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(condition, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.005)


def features_chunk_files(paths: VolumePaths) -> list[Path]:
    staged = paths.staged_array("features")
    return [p for p in staged.glob("*") if not p.name.startswith(".")] if staged.exists() else []


def test_kill_mid_write_then_rerun(tmp_path, tiny_model_dir):
    paths = VolumePaths(tmp_path, 0)
    proc = start_slow_run(tmp_path, tiny_model_dir)
    wait_for(lambda: len(features_chunk_files(paths)) > 0 or proc.poll() is not None)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not paths.metadata.exists(), "a killed run must not look complete"
    assert paths.staging.exists()
    assert read_json(paths.status)["state"] == "running"
    result = run_script("preprocess_volume.py", *slow_args(tmp_path, tiny_model_dir))
    assert result.returncode == 0, result.stderr
    assert "removing debris" in result.stderr
    assert paths.metadata.exists() and not paths.staging.exists()
    assert read_json(paths.status)["state"] == "complete"
    assert open_array(paths.array("features")).shape == (32, 64, 64, 64)


def test_sigterm_is_recorded_and_cleaned_up(tmp_path, tiny_model_dir):
    paths = VolumePaths(tmp_path, 0)
    proc = start_slow_run(tmp_path, tiny_model_dir)
    wait_for(lambda: len(features_chunk_files(paths)) > 0 or proc.poll() is not None)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "terminated by signal 15" in err and "Traceback" not in err
    status = read_json(paths.status)
    assert status["state"] == "failed" and "Terminated" in status["error"]
    assert not paths.metadata.exists() and not paths.staging.exists()


def test_concurrent_runs_of_one_index(tmp_path, tiny_model_dir):
    paths = VolumePaths(tmp_path, 0)
    first = start_slow_run(tmp_path, tiny_model_dir)
    wait_for(lambda: paths.staging.exists() or first.poll() is not None)
    second = call_main("preprocess_volume", *preprocess_args(tmp_path, 0, tiny_model_dir))  # in-process: starts at once
    assert second.returncode == 3
    assert "being processed by another run" in second.stderr and "Traceback" not in second.stderr
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert paths.metadata.exists()


def test_old_volume_stays_valid_during_overwrite(tmp_path, tiny_model_dir, monkeypatch):
    """An overwrite paused after its first features block (deterministically mid-run): the
    old volume is still the committed one, whole and readable."""
    import preprocess_volume as script
    from dinov3_cache.extraction import pipeline, writer
    from dinov3_cache.extraction.settings import config_from_args
    from dinov3_cache.sources.base import source_from_args

    paths = VolumePaths(tmp_path, 0)
    args = preprocess_args(tmp_path, 0, tiny_model_dir)
    call_main("preprocess_volume", *args, check=True)
    old = read_json(paths.metadata)
    old_features = read(paths.array("features"))

    paused, checked = threading.Event(), threading.Event()
    write = writer.AsyncBlockWriter.write

    def write_then_pause(self, name, *rest, **kwargs):
        write(self, name, *rest, **kwargs)
        if name == "features" and not paused.is_set():
            paused.set()
            checked.wait(120)

    monkeypatch.setattr(writer.AsyncBlockWriter, "write", write_then_pause)
    options = script.build_parser().parse_args([*map(str, args), "--overwrite"])
    result: dict = {}

    def overwrite() -> None:
        try:
            result["outcome"] = pipeline.preprocess_volume(config_from_args(options), source_from_args(options))
        except BaseException as e:  # reported below
            result["error"] = e

    thread = threading.Thread(target=overwrite)
    thread.start()
    try:
        assert paused.wait(120), "the overwrite never wrote a features block"
        assert paths.staging.exists() and read_json(paths.status)["state"] == "running"
        assert read_json(paths.metadata)["integrity"]["commit_id"] == old["integrity"]["commit_id"]
        np.testing.assert_array_equal(read(paths.array("features")), old_features)
    finally:
        checked.set()
        thread.join(300)
    assert "error" not in result, result.get("error")
    assert result["outcome"].state == "complete"
    assert read_json(paths.metadata)["integrity"]["commit_id"] != old["integrity"]["commit_id"]


def test_progress_lines_in_log_files(built_cache, tmp_path, tiny_model_dir):
    result = run_script("preprocess_volume.py", *preprocess_args(tmp_path, 0, tiny_model_dir), check=True)
    assert "volume 0: 48/48 slices" in result.stderr  # stderr is a pipe, as in a job log


def test_random_demo_model_is_marked(tmp_path):
    result = call_main("preprocess_volume", "--volume-index", "0", "--output-dir", tmp_path, "--source", "synthetic",
                        "--model-id", "random:tiny", *TINY_GEOMETRY_ARGS, check=True)
    assert "RANDOM weights" in result.stderr
    meta = read_json(VolumePaths(tmp_path, 0).metadata)
    assert meta["configuration"]["pretrained"] is False
    assert meta["provenance"]["model"]["pretrained"] is False


def file(tmp_path: Path) -> Path:
    path = tmp_path / "a_file"
    path.write_text("not a directory")
    return path


BEFORE_WORK, DURING_WORK = 2, 1  # bad options found before anything ran; a run that failed


@pytest.mark.parametrize(
    "change, message, status",
    [
        (lambda a, t, m: a.__setitem__(1, "-1"), "--volume-index must be between 0 and", BEFORE_WORK),
        (lambda a, t, m: a.extend(["--chunks", "256,16,16"]), "--chunks needs 4 positive integers", BEFORE_WORK),
        (lambda a, t, m: a.extend(["--chunks", "a,b,c,d"]), "--chunks needs 4 positive integers", BEFORE_WORK),
        (lambda a, t, m: a.extend(["--base-resolution", "100"]), "must be a whole multiple", BEFORE_WORK),
        (lambda a, t, m: a.extend(["--batch-size", "0"]), "--batch-size must be positive", BEFORE_WORK),
        (lambda a, t, m: a.extend(["--planes", "xy", "xy"]), "--planes lists a plane twice", BEFORE_WORK),
        (lambda a, t, m: a.__setitem__(3, str(file(t) / "out")), "cannot create output directory", DURING_WORK),
        (lambda a, t, m: a.extend(["--organelles", "golgi"]), "unknown organelle(s) golgi", BEFORE_WORK),
        (lambda a, t, m: a.extend(["--output-image-dim", "10"]), "not a multiple of the model's patch size", BEFORE_WORK),
        (lambda a, t, m: a.__setitem__(a.index(str(m)), str(t / "no-such-model")), "cannot read the config of model", BEFORE_WORK),
        (lambda a, t, m: a.__setitem__(a.index(str(m)), "random:"), "unknown random model 'random:'", BEFORE_WORK),
        (lambda a, t, m: a.__setitem__(a.index(str(m)), "no-such-org/no-such-model"), "HF_HUB_OFFLINE", BEFORE_WORK),
        (lambda a, t, m: a.extend(["--source", "nowhere"]), "unknown --source", BEFORE_WORK),
        # the source's crops are drawn (and say what they cannot do) only once the run has started
        (lambda a, t, m: a.extend(["--crop-filter", "crop1"]), "--source synthetic has none", DURING_WORK),
        (lambda a, t, m: a.extend(["--min-label-fraction", "1.1"]), "none of 100 candidate crops passed the filters", DURING_WORK),
        (lambda a, t, m: a.extend(["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "tpu"]), "--device", BEFORE_WORK),
    ],
)
def test_bad_input_gets_one_clear_line(tmp_path, tiny_model_dir, built_cache, change, message, status):
    args = preprocess_args(tmp_path / "out", 0, tiny_model_dir)
    change(args, tmp_path, tiny_model_dir)
    result = call_main("preprocess_volume", *args)
    assert result.returncode == status
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert not list((tmp_path / "out").glob("volume_*")) if (tmp_path / "out").exists() else True
    if status == BEFORE_WORK:  # nothing was done: not even the output directory
        assert not (tmp_path / "out").exists()


def test_bad_input_from_the_command_line_exits_without_traceback(tmp_path, tiny_model_dir):
    result = run_script("preprocess_volume.py", *preprocess_args(tmp_path, 0, tiny_model_dir, "--organelles", "golgi"))
    assert result.returncode == 2 and "Traceback" not in result.stderr  # found before the model loads
    assert result.stderr.strip().splitlines()[-1].startswith("error: unknown organelle(s) golgi")


def test_bad_input_leaves_existing_volume_intact(tmp_path, tiny_model_dir, built_cache):
    out = tmp_path / "cache"
    shutil.copytree(built_cache, out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and "logs" not in p.parts}
    result = call_main("preprocess_volume", *preprocess_args(out, 0, tiny_model_dir, "--chunks", "0,1,1,1", "--overwrite"))
    assert result.returncode == 2
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and "logs" not in p.parts} == before


def test_a_ctrl_c_after_the_commit_point_of_a_library_call_leaves_the_volume_complete(tmp_path, tiny_model_dir, monkeypatch):
    """Called as a library (no signal is held), a Ctrl-C while the commit tidies up reaches the
    caller, but the volume is committed: complete, and its status record says so."""
    import preprocess_volume as script
    from dinov3_cache import commit_protocol
    from dinov3_cache.extraction import pipeline
    from dinov3_cache.extraction.settings import config_from_args
    from dinov3_cache.sources.base import source_from_args

    def interrupted_tidy(paths):
        raise KeyboardInterrupt

    monkeypatch.setattr(commit_protocol, "tidy_volume", interrupted_tidy)
    options = script.build_parser().parse_args(list(map(str, preprocess_args(tmp_path, 0, tiny_model_dir))))
    with pytest.raises(KeyboardInterrupt):
        pipeline.preprocess_volume(config_from_args(options), source_from_args(options))
    paths = VolumePaths(tmp_path, 0)
    assert metadata_is_intact(read_json(paths.metadata))
    assert read_json(paths.status)["state"] == "complete"
