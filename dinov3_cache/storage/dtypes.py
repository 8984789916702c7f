"""Stored dtypes as torch sees them: the one table from dtype names to torch dtypes, and numpy
views of tensors (bfloat16 through ml_dtypes, as TensorStore uses). The writer, the storage
forms and the loader share them."""

from __future__ import annotations

import numpy as np
import torch

from dinov3_cache.errors import CacheError

TORCH_DTYPES = {
    "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64,
    "uint8": torch.uint8, "uint16": torch.uint16, "uint32": torch.uint32, "uint64": torch.uint64,
    "int8": torch.int8, "int16": torch.int16, "int32": torch.int32, "int64": torch.int64, "bool": torch.bool,
}


def torch_dtype(name: str) -> torch.dtype:
    try:
        return TORCH_DTYPES[name]
    except KeyError:
        raise CacheError(f"stored dtype {name!r} cannot be loaded into torch") from None


def stored_torch_dtype(zarr_dtype: str) -> torch.dtype:
    """The torch dtype of a zarr dtype ('<f2', 'bfloat16', ...)."""
    name = "bfloat16" if zarr_dtype == "bfloat16" else np.dtype(zarr_dtype).name
    return torch_dtype(name)


def numpy_view(tensor: torch.Tensor) -> np.ndarray:
    """A numpy array sharing the tensor's memory."""
    if tensor.dtype == torch.bfloat16:
        import ml_dtypes

        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()
