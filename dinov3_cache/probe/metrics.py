"""Scores pooled over the test volumes: per-class IoU and F1 (Dice), their mean, and voxel
accuracy, all from one confusion matrix of the labelled voxels (the mask's unknown voxels count nowhere)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dinov3_cache.probe.options import IGNORE


def confusion(target: np.ndarray, prediction: np.ndarray, num_classes: int) -> np.ndarray:
    """counts[true, predicted] over the voxels whose labels are known."""
    known = target != IGNORE
    pairs = target[known].astype(np.int64) * num_classes + prediction[known].astype(np.int64)
    return np.bincount(pairs, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def scores(counts: np.ndarray, class_names: Sequence[str]) -> dict:
    """mean_iou, accuracy and per_class {name: {iou, f1}}; a class neither present nor
    predicted has no score (None) and stays out of the mean."""
    true_positive = np.diag(counts).astype(np.float64)
    truth, predicted = counts.sum(axis=1), counts.sum(axis=0)
    per_class = {}
    for i, name in enumerate(class_names):
        union = truth[i] + predicted[i] - true_positive[i]
        if union == 0:
            per_class[name] = {"iou": None, "f1": None}
        else:
            per_class[name] = {"iou": true_positive[i] / union, "f1": 2 * true_positive[i] / (truth[i] + predicted[i])}
    ious = [c["iou"] for c in per_class.values() if c["iou"] is not None]
    total = counts.sum()
    return {
        "mean_iou": float(np.mean(ious)) if ious else None,
        "accuracy": float(true_positive.sum() / total) if total else None,
        "per_class": {k: {m: (None if v is None else float(v)) for m, v in c.items()} for k, c in per_class.items()},
        "voxels": int(total),
    }
