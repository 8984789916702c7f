"""A probe run: for each cache a linear probe on its features, then the two baselines (the
majority class; the same probe on raw intensity and fixed filters), scored on the test volumes."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from dinov3_cache.errors import UsageError
from dinov3_cache.loader.dataloader import create_preprocessed_dataloader
from dinov3_cache.loader.volumes import CachedVolume
from dinov3_cache.probe.metrics import confusion, scores
from dinov3_cache.probe.options import ProbeOptions, ProbePlan, plan_probe, read_labels
from dinov3_cache.probe.raw import RAW_CHANNELS, raw_features
from dinov3_cache.probe.train import LinearProbe, TrainingTime, predict, print_progress, train_probe
from dinov3_cache.storage.base import DEFAULT_STORAGE_FORM

RAW_ROW = "raw + filters"
MAJORITY_ROW = "majority class"


@dataclass
class ProbeResult:
    """The table's rows (what --json writes), each features row's training time, and the
    test predictions (row name -> volume index -> classes (D, H, W)) for the PNG."""

    plan: ProbePlan
    rows: list[dict] = field(default_factory=list)
    timings: dict[str, TrainingTime] = field(default_factory=dict)
    predictions: dict[str, dict[int, np.ndarray]] = field(default_factory=dict)
    test_targets: dict[int, np.ndarray] = field(default_factory=dict)
    test_raw: dict[int, np.ndarray] = field(default_factory=dict)  # raw at label resolution, when reachable


def device_of(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a torch device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name} asked for, but no CUDA GPU is visible; use --device cpu")
    return device


@contextlib.contextmanager
def one_torch_thread(device: torch.device):
    """On the CPU the head's small steps run on one thread: the same sums in the same order on
    any machine, and no threads spinning against the loader's (3x faster on a loaded 2-core VM)."""
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def probe_caches(options: ProbeOptions, progress: Callable[[str], None] | None = print_progress) -> ProbeResult:
    """Check the input, then train and score every probe; CacheToolError on failure."""
    device = device_of(options.device)
    with one_torch_thread(device):
        return probe_with(options, plan_probe(options), device, progress)


def probe_with(options: ProbeOptions, plan: ProbePlan, device: torch.device, progress: Callable[[str], None] | None) -> ProbeResult:
    result = ProbeResult(plan)
    first_cache = next(iter(plan.test))
    result.test_targets = {v.index: plan.classes.target(*read_labels(v)) for v in plan.test[first_cache]}
    for name, cache in zip(plan.names, plan.train, strict=True):
        batches = feature_batches(plan, cache, device)
        try:
            probe, timing = train_probe(
                batches, len(plan.classes.names), plan.class_counts, options.steps, options.learning_rate,
                options.seed, device, name, progress,
            )
        finally:
            batches.close()  # stops the loader's read-ahead
        predictions = predict_test_features(plan, cache, probe, device)
        add_row(result, name, "features", predictions, describe_cache(plan.test[cache][0]) | {"cache": str(cache)})
        result.timings[name] = timing
    add_majority_row(result)
    add_raw_row(result, device, progress)
    return result


def feature_batches(plan: ProbePlan, cache: Path, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Random training crops through the project's loader, pass after pass (each a new epoch of crops)."""
    options = plan.options
    loader = create_preprocessed_dataloader(
        cache, batch_size=options.batch_size, shuffle=True, num_threads=options.num_threads,
        volume_indices=[v.index for v in plan.train[cache]], crop_size=plan.crop_size, seed=options.seed,
        device=device if device.type == "cuda" else None,
    )
    while True:
        for features, gt, mask in loader:
            yield features, plan.classes.target(gt, mask)


def predict_test_features(plan: ProbePlan, cache: Path, probe: LinearProbe, device: torch.device) -> dict[int, np.ndarray]:
    """Whole test volumes through the loader, one at a time; labels checked against the reference."""
    volumes = plan.test[cache]
    loader = create_preprocessed_dataloader(
        cache, batch_size=1, num_threads=plan.options.num_threads, volume_indices=[v.index for v in volumes],
    )
    predictions = {}
    for volume, (features, _gt, _mask) in zip(volumes, loader, strict=True):
        predictions[volume.index] = predict(probe, features[0]).numpy().astype(np.uint8 if len(plan.classes.names) < 256 else np.int64)
    return predictions


def describe_cache(volume: CachedVolume) -> dict:
    config = volume.metadata.configuration
    return {
        "model_id": config.model_id, "layout": config.layout or DEFAULT_STORAGE_FORM, "features_dtype": config.features_dtype,
        "channels": volume.features_shape[0], "planes": list(config.planes),
    }


def add_row(result: ProbeResult, name: str, kind: str, predictions: dict[int, np.ndarray], extra: dict) -> None:
    num_classes = len(result.plan.classes.names)
    counts = sum(confusion(result.test_targets[i], p, num_classes) for i, p in predictions.items())
    row = {"name": name, "kind": kind} | scores(counts, result.plan.classes.names) | extra
    result.rows.append(row)
    result.predictions[name] = predictions


def add_majority_row(result: ProbeResult) -> None:
    majority = int(np.argmax(result.plan.class_counts))
    predictions = {i: np.full(t.shape, majority, np.uint8) for i, t in result.test_targets.items()}
    add_row(result, MAJORITY_ROW, "majority", predictions, {"class": result.plan.classes.names[majority]})


# ----------------------------------------------------------------------------- raw baseline


def add_raw_row(result: ProbeResult, device: torch.device, progress: Callable[[str], None] | None) -> None:
    """The same probe on raw intensity and filters (of the first cache's volumes), or a row
    saying why raw is not reachable."""
    plan = result.plan
    cache = next(iter(plan.train))
    stacks, targets = {}, {}
    for volume in plan.train[cache] + plan.test[cache]:
        gt, mask = read_labels(volume)
        stack, origin = raw_features(volume, gt)
        if stack is None:
            result.rows.append({"name": RAW_ROW, "kind": "raw", "mean_iou": None, "accuracy": None, "per_class": {},
                                "reachable": False, "note": f"raw not reachable: {origin}"})
            return
        stacks[volume.index], targets[volume.index] = stack, plan.classes.target(gt, mask)
    train = [v.index for v in plan.train[cache]]
    probe, timing = train_probe(
        raw_batches(stacks, targets, train, plan), len(plan.classes.names), plan.class_counts, plan.options.steps,
        plan.options.learning_rate, plan.options.seed, device, RAW_ROW, progress,
    )
    predictions = {v.index: predict(probe, stacks[v.index]).numpy().astype(np.uint8) for v in plan.test[cache]}
    result.test_raw = {v.index: stacks[v.index][0].numpy() for v in plan.test[cache]}
    add_row(result, RAW_ROW, "raw", predictions, {"channels": list(RAW_CHANNELS), "raw_from": origin})
    result.timings[RAW_ROW] = timing


def raw_batches(stacks: dict, targets: dict, train: Sequence[int], plan: ProbePlan) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Random crops of the in-memory filter stacks, as many and as large as the features' crops."""
    rng = np.random.default_rng(plan.options.seed)
    crop = plan.crop_size
    while True:
        xs, ts = [], []
        for _ in range(plan.options.batch_size):
            index = train[int(rng.integers(len(train)))]
            shape = stacks[index].shape[1:]
            corner = [int(rng.integers(0, s - c + 1)) for s, c in zip(shape, crop, strict=True)]
            region = tuple(slice(o, o + c) for o, c in zip(corner, crop, strict=True))
            xs.append(stacks[index][(slice(None), *region)])
            ts.append(torch.from_numpy(targets[index][region]))
        yield torch.stack(xs), torch.stack(ts)

