"""Features built after the read (token volumes, see dinov3_cache/storage/tokens.py): where
they are built follows the batch: on the CPU when the batch is converted on the host (the
default, and every loader without device='cuda'), on the GPU otherwise: the stored values
travel (a fraction of the features' bytes) and the features are made there.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from dinov3_cache.storage.base import BuiltCrop


def fill_token_features(
    features: torch.Tensor | None,
    crops: Sequence[BuiltCrop | None],
    device: torch.device | None,
    dtype: torch.dtype | None,
) -> torch.Tensor:
    """The batch's features with every built crop made on `device` (None: the CPU). `features`
    holds the items read as stored (None when every item is built); dtype: the batch's (None:
    the stored dtype)."""
    first = next(c for c in crops if c is not None)
    if features is None:
        features = torch.empty((len(crops), *first.shape), dtype=dtype or first.stored_dtype, device=device)
    elif dtype is not None:
        features = features.to(dtype)
    for b, crop in enumerate(crops):
        if crop is not None:
            crop.features(device, out=features[b])
    return features
