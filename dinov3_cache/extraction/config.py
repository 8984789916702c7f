"""What one volume's extraction is asked to do: `ExtractionConfig`, built from
`ExtractionSettings` (settings.py, where every default lives) and a volume index, and the
values that decide the features (its fingerprint)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from dinov3_cache.errors import CacheToolError, UsageError
from dinov3_cache.extraction.normalization import normalization_for
from dinov3_cache.extraction.weights import weights_identity
from dinov3_cache.geometry import CropGeometry
from dinov3_cache.paths import VolumePaths
from dinov3_cache.sources.base import SamplingOptions, VolumeSource
from dinov3_cache.storage import FeatureStorage
from dinov3_cache.storage.planes import PLANE_AXES, PLANES
from dinov3_cache.zarr_arrays import StorageOptions

UPSAMPLING = "bilinear, align_corners=False, separable per axis"


class PreprocessingError(CacheToolError):
    """A failure a user can act on: the message is one line saying what and what to do."""


@dataclass(frozen=True)
class ExtractionConfig:
    """Everything that decides one volume's output; no defaults here (ExtractionSettings has them)."""

    volume_index: int
    output_dir: Path
    model_id: str
    model_revision: str | None
    geometry: CropGeometry
    sampling: SamplingOptions
    storage: StorageOptions
    planes: tuple[str, ...]
    batch_size: int
    features_dtype: str
    save_raw: bool
    overwrite: bool
    device: str
    storage_form: FeatureStorage  # how the features are stored (--layout): dinov3_cache/storage
    space_check: bool = True  # refuse to start a volume the output file system cannot hold

    def __post_init__(self) -> None:
        if self.volume_index < 0:
            raise UsageError(f"--volume-index must be >= 0, got {self.volume_index}")
        if self.batch_size <= 0:
            raise UsageError(f"--batch-size must be positive, got {self.batch_size}")
        unknown = [p for p in self.planes if p not in PLANE_AXES]
        if unknown or not self.planes:
            raise UsageError(f"--planes must be some of {' '.join(PLANES)}, got {' '.join(self.planes)}")
        if len(set(self.planes)) != len(self.planes):
            raise UsageError(f"--planes lists a plane twice: {' '.join(self.planes)}")

    @property
    def paths(self) -> VolumePaths:
        return VolumePaths(Path(self.output_dir), self.volume_index)

    def fingerprint_values(self, source: VolumeSource) -> dict:
        """The settings that decide the feature values (storage and its form, --layout, left out), known
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


def check_slice_size(geometry: CropGeometry, patch_size: int) -> None:
    """The slices must tile into whole patches of the model."""
    if geometry.slice_size % patch_size:
        raise PreprocessingError(
            f"slice size {geometry.slice_size} (= --output-image-dim {geometry.output_image_dim} x "
            f"{geometry.raw_per_label} raw voxels per label voxel) is not a multiple of the model's patch size "
            f"{patch_size}; change --output-image-dim or the resolutions"
        )
