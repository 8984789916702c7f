"""The raw-intensity baseline's input: each volume's raw at label resolution, read from the
cache's raw array (--save-raw) or read again from the source crop the metadata records,
and a few fixed filters of it (Gaussian-smoothed and gradient magnitude at two scales)."""

from __future__ import annotations

import types

import numpy as np
import torch
import torch.nn.functional as F

from dinov3_cache.errors import CacheToolError, first_line
from dinov3_cache.geometry import CropGeometry
from dinov3_cache.loader.volumes import CachedVolume
from dinov3_cache.zarr_arrays import open_array

FILTER_SIGMAS = (1.0, 2.0)  # label voxels
RAW_CHANNELS = ("raw",) + tuple(f"gauss {s:g}" for s in FILTER_SIGMAS) + tuple(f"gradient {s:g}" for s in FILTER_SIGMAS)


def raw_at_slice_resolution(volume: CachedVolume, gt: np.ndarray) -> tuple[np.ndarray | None, str]:
    """(raw (S, S, S), where it came from) or (None, why it is not reachable)."""
    if "raw" in volume.metadata.paths and volume.array_path("raw").is_dir():
        return open_array(volume.array_path("raw"))[...].read().result(), "the cache's raw array"
    try:
        crop = resample_source_crop(volume)
    except (CacheToolError, OSError, KeyError, TypeError, ValueError) as e:
        return None, (f"volume {volume.index} has no raw array (extract with --save-raw) and its source crop "
                      f"cannot be read again ({first_line(e, 200)})")
    if crop.gt.shape != gt.shape or not np.array_equal(crop.gt, gt):
        return None, f"volume {volume.index}: the source crop read again does not match the cache's labels"
    return crop.raw, f"the {crop_source_name(volume)} source crop, read again"


def crop_source_name(volume: CachedVolume) -> str:
    return (volume.metadata.configuration.fingerprint_inputs.get("source") or {}).get("source", "unknown")


def resample_source_crop(volume: CachedVolume):
    """The crop the volume was extracted from: its source as the metadata records it (name,
    data root, augmentation; the catalog saved in the cache), sampled with the recorded options.
    Same index and options give the same crop on any machine."""
    from dinov3_cache.sources.base import LabelFilters, SamplingOptions, source_from_args

    inputs = volume.metadata.configuration.fingerprint_inputs
    recorded, sampling = inputs.get("source") or {}, inputs["sampling"]
    args = types.SimpleNamespace(
        source=recorded.get("source"), data_root=recorded.get("root"), catalog=None, s3_endpoint=None,
        output_dir=str(volume.paths.output_dir), augment=bool(recorded.get("augment", False)), refresh_catalog=False,
        num_threads=4,
    )
    options = SamplingOptions(
        organelles=tuple(sampling["organelles"]), filters=LabelFilters(**sampling["filters"]),
        gt_extension=sampling["gt_extension"], crop_filter=tuple(sampling.get("crop_filter") or ()),
        inference_filter=tuple(sampling.get("inference_filter") or ()),
    )
    config = volume.metadata.configuration
    geometry = CropGeometry(config.base_resolution, config.min_resolution_for_raw, config.output_image_dim)
    return source_from_args(args).sample(volume.index, geometry, options)


def raw_at_label_resolution(raw: np.ndarray, volume: CachedVolume) -> torch.Tensor:
    """Area-average the slice-resolution raw onto the label grid, intensities mapped to [0, 1]."""
    depth = volume.spatial_shape[0]
    factor = max(1, raw.shape[0] // depth)
    lo, hi = volume.metadata.configuration.intensity_range or (0.0, 255.0)
    values = torch.from_numpy(raw.astype(np.float32))[None, None]
    values = F.avg_pool3d(values, factor)[0, 0]
    return (values - lo) / (hi - lo if hi > lo else 1.0)


def gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, int(round(3 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def gaussian(volume: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian of a (D, H, W) volume, edges replicated."""
    kernel = gaussian_kernel(sigma)
    radius = kernel.numel() // 2
    x = volume[None, None]
    for axis in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = kernel.numel()
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius
        x = F.conv3d(F.pad(x, pad, mode="replicate"), kernel.view(shape))
    return x[0, 0]


def gradient_magnitude(volume: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(sum(g**2 for g in torch.gradient(volume)))


def filter_stack(raw: torch.Tensor) -> torch.Tensor:
    """(len(RAW_CHANNELS), D, H, W): raw, Gaussian-smoothed and gradient magnitude at each sigma."""
    smoothed = [gaussian(raw, s) for s in FILTER_SIGMAS]
    return torch.stack([raw, *smoothed, *(gradient_magnitude(s) for s in smoothed)])


def raw_features(volume: CachedVolume, gt: np.ndarray) -> tuple[torch.Tensor | None, str]:
    """The baseline's input channels for one volume, or None and why it is not reachable."""
    raw, origin = raw_at_slice_resolution(volume, gt)
    if raw is None:
        return None, origin
    return filter_stack(raw_at_label_resolution(raw, volume)), origin
