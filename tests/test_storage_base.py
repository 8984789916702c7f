"""dinov3_cache/storage/base.py: the registry of storage forms and what every form shares."""

from __future__ import annotations

import pytest

from dinov3_cache.errors import CacheToolError
from dinov3_cache.extraction.settings import ExtractionSettings
from dinov3_cache.storage import (
    DEFAULT_STORAGE_FORM,
    RegisteredNames,
    UnknownStorageForm,
    feature_array_names,
    register_storage,
    storage_for,
    storage_form_names,
    unregister_storage,
)
from dinov3_cache.storage.dense import DenseStorage
from dinov3_cache.zarr_arrays import StorageOptions


class Renamed(DenseStorage):
    name = "renamed-dense"


def test_the_built_in_forms_are_registered_and_none_means_the_default():
    assert storage_form_names()[:2] == ("dense", "tokens")
    assert storage_for(None).name == DEFAULT_STORAGE_FORM == "dense"  # metadata written before forms were recorded
    assert storage_for("tokens").array_name == "tokens" and storage_for("dense").array_name == "features"
    assert set(feature_array_names()) >= {"features", "tokens"}


def test_an_unknown_form_is_one_line_naming_the_choices():
    with pytest.raises(UnknownStorageForm) as info:
        storage_for("sparse")
    assert isinstance(info.value, CacheToolError)
    assert str(info.value) == "--layout must be one of dense, tokens, got 'sparse'"


def test_a_name_can_be_registered_once():
    form = register_storage(Renamed())
    try:
        assert storage_for("renamed-dense") is form
        register_storage(form)  # the same form again: nothing changes
        with pytest.raises(ValueError, match="registered already"):
            register_storage(Renamed())
    finally:
        unregister_storage("renamed-dense")
    with pytest.raises(UnknownStorageForm):
        storage_for("renamed-dense")


def test_registered_names_follow_the_registry():
    names = RegisteredNames()
    assert "renamed-dense" not in names
    register_storage(Renamed())
    try:
        assert "renamed-dense" in names and list(names)[-1] == "renamed-dense"
        # the settings declared --layout before this form existed, and accept it
        assert ExtractionSettings(output_dir="x", layout="renamed-dense").config(0).storage_form.name == "renamed-dense"
    finally:
        unregister_storage("renamed-dense")
    assert "renamed-dense" not in names


def test_requested_chunks_are_the_option_or_the_forms_default():
    dense, tokens = storage_for("dense"), storage_for("tokens")
    assert dense.requested_chunks(StorageOptions()) == (256, 16, 16, 16)
    assert tokens.requested_chunks(StorageOptions()) == (128, 16, 8, 8)
    assert tokens.requested_chunks(StorageOptions(feature_chunks=(4, 3, 2, 1))) == (4, 3, 2, 1)
