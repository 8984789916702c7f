"""A volume's metadata record, built as the schema's VolumeMetadata: configuration, shapes,
storage, statistics, integrity and provenance, and the running feature statistics it reports."""

from __future__ import annotations

import platform
import sys
from dataclasses import asdict
from typing import TYPE_CHECKING

import numpy as np
import tensorstore as ts
import torch

from dinov3_cache.cluster.schedulers import current_job_id
from dinov3_cache.extraction.config import UPSAMPLING, ExtractionConfig
from dinov3_cache.extraction.model import LoadedModel
from dinov3_cache.records import now_iso
from dinov3_cache.schema import (
    Configuration,
    Integrity,
    Provenance,
    SourceDataset,
    Statistics,
    Storage,
    VolumeMetadata,
    config_fingerprint,
)
from dinov3_cache.sources.base import SourceCrop
from dinov3_cache.zarr_arrays import CHECKSUM_ALGORITHM, codec_description

if TYPE_CHECKING:  # writer.py imports FeatureStatistics from here
    from dinov3_cache.extraction.writer import StagedArrays


class FeatureStatistics:
    """Running statistics of the features, kept on the compute device (no sync per block)."""

    def __init__(self) -> None:
        self.count = 0
        self.sums: torch.Tensor | None = None  # sum, sum of squares, non-finite count
        self.low: torch.Tensor | None = None
        self.high: torch.Tensor | None = None

    def add(self, block: torch.Tensor) -> None:
        sums = torch.stack([
            block.sum(dtype=torch.float64),
            block.square().sum(dtype=torch.float64),
            (~torch.isfinite(block)).sum(dtype=torch.float64),
        ])
        low, high = block.min(), block.max()
        self.count += block.numel()
        if self.sums is None:
            self.sums, self.low, self.high = sums, low, high
        else:
            self.sums += sums
            self.low, self.high = torch.minimum(self.low, low), torch.maximum(self.high, high)

    def summary(self) -> dict:
        if self.sums is None:
            return {}
        total, total_sq, non_finite = self.sums.tolist()
        mean = total / self.count
        var = max(total_sq / self.count - mean * mean, 0.0)
        return {"mean": mean, "std": var**0.5, "min": float(self.low), "max": float(self.high), "non_finite": int(non_finite)}


def volume_metadata(
    config: ExtractionConfig,
    loaded: LoadedModel,
    crop: SourceCrop,
    staged: StagedArrays,
    checksums: dict,
    storage_bytes: dict[str, int],
    stats: FeatureStatistics,
    commit_id: str,
    fingerprint_values: dict,
    timing: dict[str, float],
) -> VolumeMetadata:
    """The volume's metadata, checked against the schema and sealed (VolumeMetadata.build)."""
    paths = config.paths
    shapes = {name: list(store.shape) for name, store in staged.stores.items()}
    shapes.setdefault("raw", list(crop.raw.shape))
    shapes.setdefault("features", list(config.geometry.feature_shape(loaded.hidden_size)))  # what a tokens volume delivers
    return VolumeMetadata.build(VolumeMetadata(
        volume_index=config.volume_index,
        volume_name=paths.name,
        timestamp=now_iso(),
        paths={name: str(paths.array(name).resolve()) for name in staged.stores},
        source_dataset=SourceDataset.from_description(crop.description),
        shapes=shapes,
        dtypes={name: str(store.dtype.numpy_dtype) for name, store in staged.stores.items()},
        configuration=configuration(config, loaded, crop, staged, shapes, fingerprint_values),
        timing=timing,
        storage=Storage(array_gb={name: round(n / 1e9, 6) for name, n in storage_bytes.items()},
                        total_gb=round(sum(storage_bytes.values()) / 1e9, 6), bytes=storage_bytes),
        statistics=Statistics(**label_statistics(crop), features=stats.summary()),
        integrity=Integrity(
            commit_id=commit_id,
            algorithm=CHECKSUM_ALGORITHM,
            chunks={name: list(c) for name, c in staged.chunks.items()},
            crc32={name: dict(sorted(sums.items())) for name, sums in checksums.items()},
        ),
        provenance=provenance(loaded),
    ))


def configuration(
    config: ExtractionConfig, loaded: LoadedModel, crop: SourceCrop, staged: StagedArrays, shapes: dict, fingerprint_values: dict
) -> Configuration:
    stored = config.storage_form.array_name
    return Configuration(
        model_id=config.model_id,
        model_revision=loaded.identity.get("revision"),
        pretrained=loaded.identity["pretrained"],
        base_resolution=config.geometry.base_resolution,
        min_resolution_for_raw=config.geometry.min_resolution_for_raw,
        output_image_dim=config.geometry.output_image_dim,
        slice_size=config.geometry.slice_size,
        patch_size=loaded.patch_size,
        planes=list(config.planes),
        plane_combination="mean",
        slice_reduction="area mean along the plane normal",
        upsampling=UPSAMPLING,
        normalization=loaded.normalization,
        intensity_range=list(crop.raw_range),
        organelles=list(config.sampling.organelles),
        gt_extension=config.sampling.gt_extension,
        filters=asdict(config.sampling.filters),
        features_dtype=config.features_dtype,
        compression=config.storage.compression,
        zarr_format=config.storage.zarr_format,
        layout=config.storage_form.name,
        chunks=list(staged.chunks[stored]),
        codecs=codec_description(config.storage, shapes[stored], staged.chunks[stored], config.features_dtype),
        batch_size=config.batch_size,
        device=str(loaded.device),
        compute_dtype=str(loaded.compute_dtype).removeprefix("torch."),
        execution=loaded.execution,  # not fingerprinted: features equal within model.FEATURE_TOLERANCE
        voxel_size_nm={"features": list(crop.label_grid.voxel_size_nm), "raw": list(crop.raw_grid.voxel_size_nm)},
        offset_nm=list(crop.offset_nm),
        fingerprint=config_fingerprint(fingerprint_values),
        fingerprint_inputs=fingerprint_values,
    )


def label_statistics(crop: SourceCrop) -> dict:
    classes = np.unique(crop.gt if crop.mask is None else crop.gt[crop.mask.astype(bool)])
    return {
        "num_classes": int(classes.size),
        "unique_classes": [int(c) for c in classes[:1000]],
        "valid_gt_fraction": 1.0 if crop.mask is None else float(crop.mask.mean()),
    }


def provenance(loaded: LoadedModel) -> Provenance:
    import transformers

    return Provenance(
        model=loaded.identity,
        versions={
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tensorstore": getattr(ts, "__version__", None) or package_version("tensorstore"),
            "numpy": np.__version__,
        },
        host=platform.node(),
        job_id=current_job_id(),
        command=sys.argv,
    )


def package_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None
