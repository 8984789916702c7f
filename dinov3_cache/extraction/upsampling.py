"""Moved to dinov3_cache.storage.upsampling (the one definition, beside the storage forms that
use it); this name stays so that code importing it from here keeps working."""

from dinov3_cache.storage.upsampling import (  # noqa: F401
    features_from_tokens,
    interpolate_dim,
    interpolation_matrix,
    linear_weights,
    plane_features,
    rounding_bound,
    token_window,
)
