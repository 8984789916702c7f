"""Storage forms: how a volume's features are kept on disk (see base.py). Importing the package
registers the two built-in forms, dense and tokens."""

from dinov3_cache.storage import dense, tokens  # noqa: F401  (registers the built-in forms)
from dinov3_cache.storage.base import (
    DEFAULT_STORAGE_FORM,
    FeatureStorage,
    RegisteredNames,
    UnknownStorageForm,
    feature_array_names,
    register_storage,
    storage_for,
    storage_form_names,
    unregister_storage,
)

__all__ = [
    "DEFAULT_STORAGE_FORM",
    "FeatureStorage",
    "RegisteredNames",
    "UnknownStorageForm",
    "feature_array_names",
    "register_storage",
    "storage_for",
    "storage_form_names",
    "unregister_storage",
]
