"""Checks made before submitting jobs, without loading model weights: every option that
would make every job fail is refused once, with one line, before anything is submitted.

- the model's configuration is readable (a random preset, a local directory's config.json,
  a hub id's config when the hub or its cache answers) and the slice size is a multiple of
  its patch size;
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
    RANDOM_MODEL_PRESETS,
    RANDOM_PATCH_SIZE,
    ModelError,
    hub_offline_reason,
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


def model_config_values(model_id: str, revision: str | None) -> dict | None:
    """hidden_size and patch_size of a model id, read from its config alone (no weights);
    None when it is a hub id and neither the hub nor the local cache answers here."""
    if model_id.startswith("random"):
        try:
            preset = random_preset(model_id)
        except ModelError as e:
            raise PreflightError(first_line(e)) from None
        return {"hidden_size": RANDOM_MODEL_PRESETS[preset]["hidden_size"], "patch_size": RANDOM_PATCH_SIZE}
    if Path(model_id).is_dir():
        return local_config_values(Path(model_id))
    return hub_config_values(model_id, revision)


def hub_config_values(model_id: str, revision: str | None) -> dict | None:
    """The config.json of a hub id, fetched alone (huggingface_hub: no torch, no weights), or
    None when neither the hub nor the local cache has it here."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HFValidationError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    offline = hub_offline_reason()
    try:
        path = hf_hub_download(model_id, "config.json", revision=revision, local_files_only=offline is not None)
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):  # not cached, and the hub is not asked here
        return None
    except (HFValidationError, RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError) as e:
        raise PreflightError(f"cannot read the config of model {model_id!r} ({first_line(e, 160)}); check --model-id") from None
    except Exception:  # unreachable and not cached: the jobs may still reach it
        return None
    return local_config_values(Path(path).parent)


def local_config_values(directory: Path) -> dict:
    """hidden_size and patch_size from a local checkpoint's config.json (plain JSON: no torch)."""
    try:
        config = read_json(directory / "config.json")
        return {"hidden_size": int(config["hidden_size"]), "patch_size": int(config["patch_size"])}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PreflightError(
            f"cannot read the config of model {str(directory)!r} ({type(e).__name__}: {first_line(e, 160)}); check --model-id"
        ) from None


def check_model(config: ExtractionConfig) -> dict | None:
    """The model's config values, and the slice size checked against its patch size."""
    values = model_config_values(config.model_id, config.model_revision)
    if values is None:
        print(f"note: the config of {config.model_id} is not readable here (hub unreachable, not cached); "
              "its patch size is not checked (pass --skip-model-check to skip this check)")
        return None
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
