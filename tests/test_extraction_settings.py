"""ExtractionSettings: one declaration of every option, the settings file a submission writes,
its precedence (command line > settings file > defaults), and login-node imports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, TINY_GEOMETRY_ARGS, call_main, run_script

from dinov3_cache.commit_protocol import is_volume_complete
from dinov3_cache.extraction.settings import (
    SETTINGS_FORMAT,
    SETTINGS_VERSION,
    ExtractionSettings,
    settings_from_args,
    write_settings_file,
)
from dinov3_cache.paths import VolumePaths
from dinov3_cache.records import read_json
from dinov3_cache.switch import Switch
from preprocess_volume import build_parser, parse_args


def settings_file(path: Path, **values) -> Path:
    write_settings_file(path, ExtractionSettings(**values))
    return path


def test_defaults_are_the_documented_ones():
    args = parse_args(["--volume-index", "0", "--output-dir", "o"])
    assert args.base_resolution == 128.0 and args.min_resolution_for_raw == 32.0 and args.output_image_dim == 128
    assert args.planes == ["xy", "xz", "yz"] and args.batch_size == 8 and args.chunks == "auto"
    assert args.compression == "none" and args.zarr_format == 2 and args.num_threads == 8
    assert args.model_id == "facebook/dinov3-vitl16-pretrain-sat493m" and args.device == "auto"
    assert args.organelles == ["cell"] and args.min_unique_ids == 2 and args.no_gt_extension is False
    assert not (args.save_raw or args.overwrite or args.no_space_check or args.compile or args.augment)
    assert parse_args(["--volume-index", "0", "--output-dir", "o", "--compression"]).compression == "lz4"


def test_command_line_beats_settings_file_beats_defaults(tmp_path):
    path = settings_file(tmp_path / "s.json", output_dir=str(tmp_path / "from-file"), batch_size=3, planes=("xy",),
                         model_id="random:tiny", source_options={"augment": True})
    args = parse_args(["--settings", str(path), "--volume-index", "4", "--batch-size", "5", "--planes", "yz", "xz"])
    assert args.batch_size == 5 and args.planes == ["yz", "xz"]  # command line
    assert args.output_dir == str(tmp_path / "from-file") and args.model_id == "random:tiny"  # file
    assert args.augment is True  # a source option travels in the file too
    assert args.features_dtype == "float16" and args.zarr_format == 2  # defaults (also recorded in the file)
    bare = parse_args(["--settings", str(path), "--volume-index", "4"])
    assert bare.batch_size == 3 and bare.planes == ["xy"]


# each flag a settings file can hold, by dest, and the option that turns it off
OPPOSITES = {"no_gt_extension": "--gt-extension", "save_raw": "--no-save-raw", "overwrite": "--no-overwrite",
             "no_space_check": "--space-check", "compile": "--no-compile", "augment": "--no-augment"}


def test_every_flag_has_an_opposite():
    flags = {a.dest: a for a in build_parser()._actions if a.nargs == 0 and a.dest not in ("help", "refresh_catalog")}
    assert set(flags) == set(OPPOSITES) and all(isinstance(a, Switch) for a in flags.values())
    assert all(OPPOSITES[dest] in a.option_strings for dest, a in flags.items())
    assert "[--save-raw | --no-save-raw]" in build_parser().format_usage()


def test_the_command_line_turns_off_a_flag_the_settings_file_turns_on(tmp_path):
    path = settings_file(tmp_path / "s.json", output_dir="o", **{d: True for d in OPPOSITES if d != "augment"},
                         source_options={"augment": True})
    on = parse_args(["--settings", str(path), "--volume-index", "0"])
    off = parse_args(["--settings", str(path), "--volume-index", "0", *OPPOSITES.values()])
    assert all(getattr(on, dest) is True for dest in OPPOSITES)
    assert all(getattr(off, dest) is False for dest in OPPOSITES)
    again = parse_args(["--settings", str(path), "--volume-index", "0", "--no-save-raw", "--save-raw"])
    assert again.save_raw is True  # the last one given wins


def test_a_submission_accepts_the_opposites_and_writes_what_wins():
    from submit_preprocessing_jobs import build_parser as submit_parser

    args = submit_parser().parse_args(["--num-volumes", "1", "--output-dir", "o", "--save-raw", "--no-save-raw",
                                       "--no-space-check", "--compile", "--augment", "--no-augment"])
    values = settings_from_args(args).values()  # what the settings file holds
    assert values["save_raw"] is False and values["no_space_check"] is True and values["compile"] is True
    assert values["augment"] is False


def test_a_job_runs_from_the_settings_file_alone(tmp_path, tiny_model_dir):
    out = tmp_path / "cache"
    argv = ["--output-dir", str(out), "--source", "synthetic", "--model-id", str(tiny_model_dir), *TINY_GEOMETRY_ARGS,
            "--planes", "xy", "--compression", "zstd"]
    submitted = run_script("submit_preprocessing_jobs.py", "--num-volumes", "1", "--scheduler", "slurm", "--dry-run", *argv)
    document = json.loads(submitted.stdout.split("(written at submission):\n", 1)[1].split("\n# array of", 1)[0])
    path = tmp_path / "settings.json"
    path.write_text(json.dumps(document))
    call_main("preprocess_volume", "--settings", path, "--volume-index", "2", check=True)
    assert is_volume_complete(out, 2)
    configuration = read_json(VolumePaths(out, 2).metadata)["configuration"]
    assert configuration["planes"] == ["xy"] and configuration["output_image_dim"] == 16


def unknown_key(path: Path) -> None:
    path.write_text(json.dumps({"format": SETTINGS_FORMAT, "version": SETTINGS_VERSION, "settings": {"batch_sise": 3}}))


def wrong_type(path: Path) -> None:
    path.write_text(json.dumps({"format": SETTINGS_FORMAT, "version": SETTINGS_VERSION, "settings": {"planes": ["ab"]}}))


@pytest.mark.parametrize("make, message", [
    (lambda p: None, "cannot read settings file"),
    (lambda p: p.write_text("{not json"), "is not JSON"),
    (lambda p: p.write_text('{"batch_size": 3}'), "is not a settings file"),
    (lambda p: p.write_text(json.dumps({"format": SETTINGS_FORMAT, "version": 99, "settings": {}})), "has version 99"),
    (unknown_key, "unknown key(s) batch_sise"),
    (wrong_type, "planes must be one of xy, xz, yz, got 'ab'"),
])
def test_a_bad_settings_file_is_one_error_line(tmp_path, make, message):
    path = tmp_path / "settings.json"
    make(path)
    result = run_script("preprocess_volume.py", "--settings", path, "--volume-index", "0")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ") and message in result.stderr, result.stderr


@pytest.mark.parametrize("extra, message", [
    (["--planes", "ab"], "argument --planes: invalid choice: 'ab'"),
    (["--zarr-format", "4"], "argument --zarr-format: invalid choice: 4"),
    (["--batch-size", "x"], "argument --batch-size: invalid int value"),
])
def test_a_bad_option_value_is_one_error_line(tmp_path, extra, message):
    result = run_script("preprocess_volume.py", "--volume-index", "0", "--output-dir", tmp_path, *extra)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ") and message in result.stderr, result.stderr


# ----------------------------------------------------------------------------- login nodes


NOT_ON_LOGIN_NODES = ("torch", "transformers")


def imported_modules(*argv: str) -> set[str]:
    """Top-level modules a run of submit_preprocessing_jobs.py imported (python -X importtime)."""
    result = subprocess.run([sys.executable, "-X", "importtime", str(REPO / "submit_preprocessing_jobs.py"), *argv],
                            capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line.split("|")[-1] for line in result.stderr.splitlines() if line.startswith("import time:")]
    return {line.strip().split(".")[0] for line in lines[1:]}  # the first line is the header


def test_help_and_dry_run_do_not_import_torch(tmp_path):
    help_modules = imported_modules("--help")
    dry_run_modules = imported_modules("--num-volumes", "3", "--scheduler", "slurm", "--dry-run",
                                       "--output-dir", str(tmp_path / "o"), "--source", "synthetic", "--model-id", "random:tiny")
    assert "argparse" in help_modules and "dinov3_cache" in dry_run_modules  # the listing is real
    for name in NOT_ON_LOGIN_NODES:
        assert name not in help_modules and name not in dry_run_modules
