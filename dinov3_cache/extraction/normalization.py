"""Mean and std that a DINOv3 checkpoint expects its input normalised with. No torch here:
the fingerprint needs them before (and without) loading the model."""

from __future__ import annotations

from pathlib import Path

from dinov3_cache.extraction.weights import is_random_model_id
from dinov3_cache.records import read_json

# Normalisation constants by pretraining data (DINOv3 model cards).
SAT493M_NORMALIZATION = {"family": "SAT-493M", "mean": [0.430, 0.411, 0.296], "std": [0.213, 0.156, 0.143]}
IMAGENET_NORMALIZATION = {"family": "LVD-1689M (ImageNet)", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def normalization_for(model_id: str) -> dict:
    """Mean/std of the pretraining data: the local preprocessor config if any, else the model family."""
    if is_random_model_id(model_id):
        return IMAGENET_NORMALIZATION
    preprocessor = Path(model_id) / "preprocessor_config.json"
    if preprocessor.is_file():
        cfg = read_json(preprocessor)
        if "image_mean" in cfg and "image_std" in cfg:
            return {"family": "preprocessor_config.json", "mean": cfg["image_mean"], "std": cfg["image_std"]}
    return SAT493M_NORMALIZATION if "sat493m" in model_id.lower() else IMAGENET_NORMALIZATION
