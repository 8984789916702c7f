"""What one volume's extraction is asked to do: `ExtractionConfig`, built from the command
line by `config_from_args`, and the settings that decide the feature values (its fingerprint)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from dinov3_cache.errors import CacheToolError
from dinov3_cache.extraction.model import normalization_for, weights_identity
from dinov3_cache.extraction.options import DEFAULT_MODEL_ID, PLANES
from dinov3_cache.geometry import CropGeometry
from dinov3_cache.layout import VolumePaths
from dinov3_cache.sources.base import LabelFilters, SamplingOptions, VolumeSource
from dinov3_cache.zarr_arrays import StorageOptions, parse_chunks

UPSAMPLING = "bilinear, align_corners=False, separable per axis"
PLANE_AXES = {"xy": (0, (1, 2)), "xz": (1, (0, 2)), "yz": (2, (0, 1))}  # normal axis, image axes (z=0, y=1, x=2)


class PreprocessingError(CacheToolError):
    """A failure a user can act on: the message is one line saying what and what to do."""


@dataclass(frozen=True)
class ExtractionConfig:
    """Everything that decides one volume's output. Defaults live in preprocess_options."""

    volume_index: int
    output_dir: Path
    model_id: str = DEFAULT_MODEL_ID
    model_revision: str | None = None
    geometry: CropGeometry = field(default_factory=CropGeometry)
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    storage: StorageOptions = field(default_factory=StorageOptions)
    planes: tuple[str, ...] = PLANES
    batch_size: int = 8
    features_dtype: str = "float16"
    save_raw: bool = False
    overwrite: bool = False
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.volume_index < 0:
            raise PreprocessingError(f"--volume-index must be >= 0, got {self.volume_index}")
        if self.batch_size <= 0:
            raise PreprocessingError(f"--batch-size must be positive, got {self.batch_size}")
        unknown = [p for p in self.planes if p not in PLANE_AXES]
        if unknown or not self.planes:
            raise PreprocessingError(f"--planes must be some of {' '.join(PLANES)}, got {' '.join(self.planes)}")
        if len(set(self.planes)) != len(self.planes):
            raise PreprocessingError(f"--planes lists a plane twice: {' '.join(self.planes)}")

    @property
    def paths(self) -> VolumePaths:
        return VolumePaths(Path(self.output_dir), self.volume_index)

    def fingerprint_values(self, source: VolumeSource) -> dict:
        """The settings that decide the feature values (storage layout left out), known
        before the model loads so that a rerun can be skipped cheaply."""
        return {
            "model_id": self.model_id,
            "weights": weights_identity(self.model_id, self.model_revision),
            "normalization": normalization_for(self.model_id),
            "geometry": asdict(self.geometry),
            "sampling": self.sampling.fingerprint_values(),
            "source": source.fingerprint_values(),
            "planes": sorted(self.planes),
            "upsampling": UPSAMPLING,
            "features_dtype": self.features_dtype,
        }


def config_from_args(args) -> ExtractionConfig:
    """The ExtractionConfig for parsed preprocess_volume.py options (see preprocess_options)."""
    return ExtractionConfig(
        volume_index=args.volume_index,
        output_dir=Path(args.output_dir),
        model_id=args.model_id,
        model_revision=args.model_revision,
        geometry=CropGeometry(args.base_resolution, args.min_resolution_for_raw, args.output_image_dim),
        sampling=SamplingOptions(
            organelles=tuple(args.organelles),
            filters=LabelFilters(args.min_label_fraction, args.min_unique_ids, args.min_ground_truth_fraction),
            gt_extension=not args.no_gt_extension,
            crop_filter=tuple(args.crop_filter),
            inference_filter=tuple(args.inference_filter),
        ),
        storage=StorageOptions(
            zarr_format=args.zarr_format,
            compression=args.compression,
            feature_chunks=parse_chunks(args.chunks),
            num_threads=args.num_threads,
        ),
        planes=tuple(args.planes),
        batch_size=args.batch_size,
        features_dtype=args.features_dtype,
        save_raw=args.save_raw,
        overwrite=args.overwrite,
        device=args.device,
    )
