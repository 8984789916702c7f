"""Checks made before submitting jobs, without loading model weights: every option that
would make every job fail is refused once, with one line, before anything is submitted.

- the model can be loaded: a random id names a preset, a local directory holds config.json
  and weights, a hub id's config is in the local cache or on a hub that answers here (with
  HF_HUB_OFFLINE set, the cache alone); and the slice size is a multiple of its patch size;
- the source's own checks (`VolumeSource.preflight`: the organelles exist in it, ...);
- the complete volumes among the requested ones were made with this configuration (else
  each such job would refuse to overwrite them)."""

from __future__ import annotations

import argparse
from pathlib import Path

from dinov3_cache.commit_protocol import committed_volume_indices
from dinov3_cache.errors import CacheToolError, UsageError, first_line
from dinov3_cache.extraction.config import ExtractionConfig, check_slice_size
from dinov3_cache.extraction.weights import (
    MODEL_CHOICES,
    RANDOM_MODEL_PRESETS,
    RANDOM_PATCH_SIZE,
    ModelError,
    hub_offline_reason,
    is_random_model_id,
    random_preset,
    weights_identity_resolved,
)
from dinov3_cache.paths import VolumePaths
from dinov3_cache.records import read_json
from dinov3_cache.schema import MetadataError, config_fingerprint, load_volume_metadata
from dinov3_cache.sources.base import SourceError, VolumeSource


class PreflightError(UsageError):
    """An option that would make every job fail; nothing was submitted."""


def add_preflight_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--skip-model-check", action="store_true",
        help="do not read the model's config before submitting (when the hub is unreachable from here but not from the jobs)",
    )


def model_config_values(model_id: str, revision: str | None) -> dict:
    """hidden_size and patch_size of a model id, read from its config alone (no weights). A
    random id must name a preset, a directory must hold a config and weights, a hub id must be
    in the local cache or on a hub that answers here (HF_HUB_OFFLINE: the cache alone)."""
    if is_random_model_id(model_id):
        try:
            preset = random_preset(model_id)
        except ModelError as e:
            raise PreflightError(first_line(e)) from None
        return {"hidden_size": RANDOM_MODEL_PRESETS[preset]["hidden_size"], "patch_size": RANDOM_PATCH_SIZE}
    if Path(model_id).is_dir():
        return local_config_values(Path(model_id))
    if not is_hub_id(model_id):
        raise PreflightError(f"cannot read the config of model {model_id!r}: no such directory, and not a Hugging Face id; {MODEL_CHOICES}")
    return hub_config_values(model_id, revision)


def is_hub_id(model_id: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(model_id)
    except HFValidationError:
        return False
    return True


def hub_config_values(model_id: str, revision: str | None) -> dict:
    """The config.json of a hub id, fetched alone (huggingface_hub: no torch, no weights): from
    the hub when it answers within seconds, else from the local cache only (what a job would load)."""
    offline = hub_offline_reason()
    path = cached_hub_config(model_id, revision) if offline else downloaded_hub_config(model_id, revision)
    if path is None:
        why = f"not in the local Hugging Face cache, and {offline}" if offline else "the hub does not answer for it"
        raise PreflightError(f"cannot read the config of model {model_id!r} ({why}); {MODEL_CHOICES}")
    return local_config_values(Path(path).parent, weights=False)


def cached_hub_config(model_id: str, revision: str | None) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    path = try_to_load_from_cache(model_id, "config.json", revision=revision)
    return path if isinstance(path, str) else None  # None: not cached; a sentinel: cached as missing


def downloaded_hub_config(model_id: str, revision: str | None) -> str | None:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HFValidationError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return hf_hub_download(model_id, "config.json", revision=revision, etag_timeout=HUB_CONFIG_TIMEOUT_SECONDS)
    except (HFValidationError, RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError) as e:
        raise PreflightError(f"cannot read the config of model {model_id!r} ({first_line(e, 160)}); check --model-id") from None
    except Exception:  # the hub stopped answering: the cache decides, as it would for a job
        return cached_hub_config(model_id, revision)


HUB_CONFIG_TIMEOUT_SECONDS = 10


def local_config_values(directory: Path, weights: bool = True) -> dict:
    """hidden_size and patch_size from a checkpoint's config.json (plain JSON: no torch); a
    local directory must also hold a readable weight file."""
    try:
        config = read_json(directory / "config.json")
        values = {"hidden_size": int(config["hidden_size"]), "patch_size": int(config["patch_size"])}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PreflightError(
            f"cannot read the config of model {str(directory)!r} ({type(e).__name__}: {first_line(e, 160)}); check --model-id"
        ) from None
    if weights:
        check_weight_files(directory)
    return values


def check_weight_files(directory: Path) -> None:
    files = sorted(p for pattern in ("*.safetensors", "*.bin") for p in directory.glob(pattern))
    if not files:
        raise PreflightError(f"model directory {str(directory)!r} holds no weights (*.safetensors or *.bin); {MODEL_CHOICES}")
    try:
        with open(files[0], "rb") as f:
            f.read(1)
    except OSError as e:
        raise PreflightError(f"cannot read the weights of model {str(directory)!r} ({e.strerror}: {files[0].name})") from None


def check_model(config: ExtractionConfig) -> dict:
    """The model's config values, and the slice size checked against its patch size. Refuses
    a model that no job could load: every job would fail after starting."""
    values = model_config_values(config.model_id, config.model_revision)
    try:
        check_slice_size(config.geometry, values["patch_size"])
    except CacheToolError as e:
        raise PreflightError(first_line(e)) from None
    return values


def check_organelles(config: ExtractionConfig, source: VolumeSource) -> None:
    """The organelles and filters against the source, as its first sample would check them."""
    try:
        source.preflight(config.sampling, config.geometry)
    except SourceError as e:
        raise PreflightError(first_line(e)) from None


def check_existing_configuration(config: ExtractionConfig, source: VolumeSource, indices: list[int]) -> str | None:
    """Refuse when a requested index is complete with another configuration: its job would
    fail, and --missing-only would not select it. Returns a note when it cannot be decided."""
    complete = sorted(set(indices) & set(committed_volume_indices(config.output_dir)))
    if not complete:
        return None
    values = config.fingerprint_values(source)
    if not weights_identity_resolved(values["weights"]):
        return f"note: the weights of {config.model_id} cannot be resolved here; complete volumes' configuration not compared"
    wanted = config_fingerprint(values)
    differing = []
    for index in complete:
        try:
            existing = load_volume_metadata(VolumePaths(config.output_dir, index).metadata).configuration.fingerprint
        except MetadataError:
            continue  # its own job reports the damage
        if existing != wanted:
            differing.append(index)
    if differing:
        from dinov3_cache.indices import format_some

        raise PreflightError(
            f"{len(differing)} requested volume(s) are complete with a different configuration "
            f"({format_some(differing, 8)}); pass --overwrite to replace them, --missing-only to skip them, "
            "or use another --output-dir"
        )
    return None
