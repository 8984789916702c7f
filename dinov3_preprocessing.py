"""DINOv3 feature extraction for one volume, streamed into a TensorStore cache: the core's
public names. The code lives in the `dinov3_cache.extraction` package; see docs/extraction.md.

    from dinov3_preprocessing import ExtractionConfig, preprocess_volume, load_model
"""

from dinov3_cache.extraction.commit import VolumeOutcome
from dinov3_cache.extraction.config import ExtractionConfig, PreprocessingError
from dinov3_cache.extraction.model import LoadedModel, ModelError, load_model
from dinov3_cache.extraction.pipeline import preprocess_volume
from dinov3_cache.extraction.settings import ExtractionSettings, config_from_args

__all__ = [
    "ExtractionConfig",
    "ExtractionSettings",
    "LoadedModel",
    "ModelError",
    "PreprocessingError",
    "VolumeOutcome",
    "config_from_args",
    "load_model",
    "preprocess_volume",
]
