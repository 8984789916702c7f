"""sources/base.py: a source option's declaration, and what every source has by default."""

from __future__ import annotations

import argparse

import pytest

from dinov3_cache.geometry import CropGeometry
from dinov3_cache.sources.base import SamplingOptions, SourceOption, VolumeSource
from dinov3_cache.switch import Switch


class BareSource(VolumeSource):
    """A source made in code alone (as benchmarks do): sample only."""

    name = "bare"

    def sample(self, volume_index, geometry, options):
        raise NotImplementedError


def test_an_option_adds_itself_with_its_declared_keywords():
    option = SourceOption("--s3-endpoint-url", {"default": "x", "help": "where"})
    parser = argparse.ArgumentParser()
    action = option.add_to(parser, "with --view: ")
    assert option.dest == action.dest == "s3_endpoint_url"
    assert action.help == "with --view: where" and action.default == "x"
    assert option.kwargs["help"] == "where"  # the declaration is not changed by a prefix
    assert parser.parse_args(["--s3-endpoint-url", "y"]).s3_endpoint_url == "y"


def test_a_switch_option_keeps_its_opposite():
    parser = argparse.ArgumentParser()
    SourceOption("--augment", {"action": Switch, "help": "h"}).add_to(parser)
    assert parser.parse_args([]).augment is False
    assert parser.parse_args(["--augment", "--no-augment"]).augment is False


def test_defaults_of_a_source():
    source = BareSource()
    assert SourceOption("--x", {}).pass_through and not SourceOption("--x", {}).locates_data
    assert not BareSource.implied_by({"data_root": "/d"}) and not BareSource.writes_when_built and BareSource.options == ()
    assert source.preflight(SamplingOptions(), CropGeometry()) is None
    assert source.fingerprint_values() == {"source": "bare"}
    with pytest.raises(NotImplementedError, match="BareSource is not built from options"):
        BareSource.from_settings({})
