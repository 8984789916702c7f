"""The loader's resumable state: a small JSON-able dict that says where in which epoch a run
is, and which dataset and loader settings that position is valid for."""

from __future__ import annotations

import hashlib
import json

from dinov3_cache.loader.volumes import CacheError

STATE_VERSION = 1
# a position is only meaningful for the same samples, batches and rank split
MUST_MATCH = ("volume_indices", "fingerprint", "samples_per_volume", "crop_size", "batch_size", "shuffle", "drop_last", "world_size")
POSITION = ("epoch", "batches_delivered", "seed")


def dataset_fingerprint(dataset) -> str:
    """What the samples of `dataset` are: each volume's index, configuration and shape, and the cropping."""
    described = {
        "volumes": [[v.index, v.fingerprint, list(v.features_shape), v.has_mask] for v in dataset.volumes],
        "samples_per_volume": dataset.samples_per_volume,
        "crop_size": None if dataset.crop_size is None else list(dataset.crop_size),
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:16]


def loader_identity(dataset, sampler) -> dict:
    """Everything in MUST_MATCH (and the rank, which a state may change) for this loader."""
    return {
        "volume_indices": [v.index for v in dataset.volumes],
        "fingerprint": dataset_fingerprint(dataset),
        "samples_per_volume": dataset.samples_per_volume,
        "crop_size": None if dataset.crop_size is None else list(dataset.crop_size),
        "batch_size": sampler.batch_size,
        "shuffle": sampler.shuffle,
        "drop_last": sampler.drop_last,
        "world_size": sampler.world_size,
        "rank": sampler.rank,
    }


def make_state(identity: dict, epoch: int, batches_delivered: int, seed: int) -> dict:
    return {"version": STATE_VERSION, "epoch": epoch, "batches_delivered": batches_delivered, "seed": seed, **identity}


def check_state(state, identity: dict, batches_per_epoch: int) -> tuple[int, int, int]:
    """(epoch, batches_delivered, seed) of a saved state, or one CacheError naming what differs."""
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise CacheError(f"not a loader state of version {STATE_VERSION} (PreprocessedDataLoader.state_dict()): {_brief(state)}")
    missing = [k for k in (*POSITION, *MUST_MATCH) if k not in state]
    if missing:
        raise CacheError(f"the loader state lacks {', '.join(missing)}")
    differing = [f"{k} {_brief(state[k])} saved, {_brief(identity[k])} here" for k in MUST_MATCH if state[k] != identity[k]]
    if differing:
        raise CacheError(f"the loader state belongs to another dataset or loader setup: {'; '.join(differing)}")
    epoch, delivered, seed = (state[k] for k in POSITION)
    if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in (epoch, delivered, seed)):
        raise CacheError(f"the loader state has an invalid position: epoch {epoch!r}, batches_delivered {delivered!r}, seed {seed!r}")
    if delivered > batches_per_epoch:
        raise CacheError(f"the loader state says {delivered} batches were delivered, but an epoch has {batches_per_epoch}")
    return epoch, delivered, seed


def _brief(value) -> str:
    text = json.dumps(value) if isinstance(value, (dict, list, int, str, type(None))) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
