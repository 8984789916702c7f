"""DINOv3 feature extraction for one volume, streamed into a TensorStore cache: the core's
public names. The code lives in the `dinov3_cache.extraction` package; see docs/extraction.md.

    from dinov3_preprocessing import ExtractionConfig, preprocess_volume, load_model

It is not a command: `python dinov3_preprocessing.py` says which script to run (exit 2).
"""

import sys

from dinov3_cache.errors import EXIT_USAGE
from dinov3_cache.interrupt import ctrl_c_exits_at_once

NOT_A_COMMAND = (
    "error: dinov3_preprocessing.py is a library module for Python code, not a command; run "
    "preprocess_volume.py (one volume) or submit_preprocessing_jobs.py (many volumes), e.g. "
    "python preprocess_volume.py --help"
)

with ctrl_c_exits_at_once(__name__):  # torch loads here (seconds): Ctrl-C meanwhile is one line, exit 130
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

if __name__ == "__main__":
    print(NOT_A_COMMAND, file=sys.stderr)
    sys.exit(EXIT_USAGE)
