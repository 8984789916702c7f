"""sources/registry.py: every source declares its options once, the command lines take them
from that declaration, the options choose and build a source, and preflight asks the source
without knowing which one it is; a source registered in a test alone goes through all of it."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

import cellmap_data as data
import pytest

import check_preprocessing
from dinov3_cache.extraction.preflight import PreflightError, check_organelles
from dinov3_cache.extraction.settings import (
    ExtractionSettings,
    add_extraction_arguments,
    settings_from_args,
    source_option_actions,
)
from dinov3_cache.geometry import CropGeometry
from dinov3_cache.sources import registry
from dinov3_cache.sources.base import SamplingOptions, SourceCrop, SourceError, SourceOption, VolumeSource
from dinov3_cache.sources.cellmap import CATALOG_FILE_NAME, CellMapSource
from dinov3_cache.sources.synthetic import SyntheticSource

TINY = ["--base-resolution", "128", "--min-resolution-for-raw", "32", "--output-image-dim", "16"]


def extraction_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_extraction_arguments(parser)
    return parser


def actions_by_flag(parser: argparse.ArgumentParser) -> dict[str, list[argparse.Action]]:
    found: dict[str, list[argparse.Action]] = {}
    for action in parser._actions:
        for flag in action.option_strings:
            found.setdefault(flag, []).append(action)
    return found


@pytest.fixture
def no_data_root_env(monkeypatch):
    monkeypatch.delenv("DINOV3_DATA_ROOT", raising=False)


# ----------------------------------------------------------------------------- options declared once


def test_each_flag_is_declared_by_one_source():
    flags = [o.flag for cls in registry.SOURCE_TYPES.values() for o in cls.options]
    assert len(flags) == len(set(flags))
    assert {"--data-root", "--catalog", "--s3-endpoint", "--augment", "--refresh-catalog"} <= set(flags)


def test_the_extraction_options_are_the_declared_ones():
    by_flag = actions_by_flag(extraction_parser())
    for option in registry.declared_options():
        [action] = by_flag[option.flag]  # once, from the declaration
        assert action.dest == option.dest
        assert action.help == option.kwargs["help"]
        assert action.default == option.kwargs.get("default", action.default)
    assert by_flag["--source"][0].help == registry.source_choice_help()


def test_jobs_receive_the_pass_through_options_only():
    assert set(source_option_actions()) == {o.dest for o in registry.pass_through_options()}
    assert "augment" in source_option_actions() and "refresh_catalog" not in source_option_actions()
    args = extraction_parser().parse_args(["--output-dir", "o", "--data-root", "/d", "--refresh-catalog", "--augment"])
    settings = settings_from_args(args)
    assert settings.source_options == {"data_root": "/d", "catalog": None, "s3_endpoint": None, "augment": True}


def test_the_viewer_takes_the_data_location_options_from_the_same_declaration():
    by_flag = actions_by_flag(check_preprocessing.build_parser())
    located = [o for o in registry.declared_options() if o.locates_data]
    assert [o.flag for o in located] == ["--data-root", "--catalog", "--s3-endpoint"]
    for option in located:
        [action] = by_flag[option.flag]
        assert action.dest == option.dest and action.default is None
        assert action.help.startswith("with --view") and action.help.endswith(option.kwargs["help"])
    assert "--augment" not in by_flag and "--refresh-catalog" not in by_flag
    args = check_preprocessing.build_parser().parse_args(["--output-dir", "o", "--view", "0", "--catalog", "c.json"])
    assert (args.data_root, args.catalog, args.s3_endpoint) == (None, "c.json", None)


# ----------------------------------------------------------------------------- choosing and building


@pytest.mark.parametrize("settings, expected", [
    ({"source": "synthetic"}, "synthetic"),
    ({"source": "cellmap"}, "cellmap"),
    ({"data_root": "/data"}, "cellmap"),
    ({"catalog": "catalog.json"}, "cellmap"),
    ({"source": "synthetic", "data_root": "/data"}, "synthetic"),  # --source wins
])
def test_options_choose_the_source(settings, expected, no_data_root_env):
    assert registry.source_name(settings) == expected


def test_the_data_root_variable_implies_its_source(monkeypatch):
    assert registry.implied_source_name({}) is None
    monkeypatch.setenv("DINOV3_DATA_ROOT", "/data")
    assert registry.implied_source_name({}) == "cellmap"


@pytest.mark.parametrize("settings, message", [
    ({}, "no data source given: pass --data-root ROOT (or set DINOV3_DATA_ROOT) or --catalog FILE for CellMap data, "
         "or --source synthetic for the built-in demo data"),
    ({"source": "nowhere"}, "unknown --source 'nowhere'; choose from cellmap, synthetic"),
])
def test_no_or_unknown_source_is_one_line(settings, message, no_data_root_env):
    with pytest.raises(SourceError) as e:
        registry.source_from_settings(settings)
    assert str(e.value) == message


def test_a_source_builds_itself_from_plain_option_values(tmp_path, no_data_root_env):
    assert isinstance(registry.source_from_settings({"source": "synthetic"}), SyntheticSource)
    root, out = tmp_path / "data", tmp_path / "out"
    data.build_alpha(root)
    out.mkdir()
    source = registry.source_from_settings({"data_root": str(root), "output_dir": str(out), "augment": True})
    assert isinstance(source, CellMapSource) and source.augment
    assert source.catalog.root == str(root.resolve()) and "jrc_alpha" in [d.name for d in source.catalog.datasets]
    assert (out / CATALOG_FILE_NAME).is_file()  # why a dry run does not build it
    assert registry.source_type({"data_root": str(root)}).writes_when_built
    assert not registry.source_type({"source": "synthetic"}).writes_when_built


# ----------------------------------------------------------------------------- preflight


def extraction_config(tmp_path, *options: str):
    args = extraction_parser().parse_args(["--output-dir", str(tmp_path), *TINY, *options])
    return settings_from_args(args).config(0)


def test_preflight_asks_the_synthetic_source(tmp_path):
    source = SyntheticSource()
    check_organelles(extraction_config(tmp_path, "--organelles", "mito", "nuc"), source)
    with pytest.raises(PreflightError, match="unknown organelle.s. golgi for --source synthetic"):
        check_organelles(extraction_config(tmp_path, "--organelles", "golgi"), source)


def test_preflight_asks_the_cellmap_source(tmp_path, no_data_root_env):
    root = tmp_path / "data"
    data.build_alpha(root)
    source = registry.source_from_settings({"data_root": str(root)})
    check_organelles(extraction_config(tmp_path, "--organelles", "mito"), source)
    with pytest.raises(PreflightError, match="golgi"):
        check_organelles(extraction_config(tmp_path, "--organelles", "golgi"), source)


# ----------------------------------------------------------------------------- a source added in a test


class CountingSource(VolumeSource):
    """A toy source: its own option, implied by it, built from it, with its own preflight."""

    name = "counting"
    summary = "implied by --count-from"
    choice_hint = "--count-from N for counting data"
    options = (SourceOption("--count-from", {"type": int, "default": None, "help": "first count"}),)

    def __init__(self, start: int):
        self.start = start

    @classmethod
    def implied_by(cls, settings: Mapping[str, Any]) -> bool:
        return settings.get("count_from") is not None

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> CountingSource:
        return cls(settings["count_from"])

    def preflight(self, options: SamplingOptions, geometry: CropGeometry) -> None:
        if options.organelles != ("cell",):
            raise SourceError("--source counting has the organelle 'cell' only")

    def sample(self, volume_index: int, geometry: CropGeometry, options: SamplingOptions) -> SourceCrop:
        raise NotImplementedError


@pytest.fixture
def counting_registered(monkeypatch):
    monkeypatch.setitem(registry.SOURCE_TYPES, CountingSource.name, CountingSource)
    registry.declared_options.cache_clear()
    yield
    monkeypatch.undo()
    registry.declared_options.cache_clear()


def test_a_new_source_needs_only_its_class_in_the_registry(counting_registered, tmp_path, no_data_root_env):
    parser = argparse.ArgumentParser()
    registry.add_source_arguments(parser)
    args = parser.parse_args(["--count-from", "7"])
    settings = {**vars(args), "source": None}
    assert registry.source_name(settings) == "counting"
    source = registry.source_from_settings(settings)
    assert isinstance(source, CountingSource) and source.start == 7
    assert "'counting' (implied by --count-from)" in registry.source_choice_help()
    with pytest.raises(SourceError, match="or --count-from N for counting data$"):
        registry.source_name({})
    check_organelles(extraction_config(tmp_path), source)
    with pytest.raises(PreflightError, match="'cell' only"):
        check_organelles(extraction_config(tmp_path, "--organelles", "mito"), source)


def test_source_options_are_not_also_settings_fields():
    """No source option is declared a second time as an ExtractionSettings field."""
    names = {f for f in ExtractionSettings.__dataclass_fields__}
    assert not names & {o.dest for o in registry.declared_options()}
