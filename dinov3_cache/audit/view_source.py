"""The source data behind a cached volume, for the viewer: asked of the source that wrote the
volume (`VolumeSource.viewer_layers`). When no option locates source data there is nothing
to add; when the source cannot be reached the caller prints one note and shows the cached
volume alone."""

from __future__ import annotations

from pathlib import Path

from dinov3_cache.errors import CacheToolError
from dinov3_cache.paths import VolumePaths
from dinov3_cache.schema import load_volume_metadata
from dinov3_cache.sources.base import SourceError
from dinov3_cache.sources.registry import SOURCE_TYPES, implied_source_name
from dinov3_cache.sources.viewer import SourceLayer, SourceOrigin


def wants_source(args) -> bool:
    return implied_source_name(vars(args)) is not None  # the options locate source data


def source_layers(output_dir: Path, index: int, args) -> tuple[list[SourceLayer], SourceOrigin | None]:
    """(layers, origin) for the volume's source crop; SourceError when it cannot be reached."""
    metadata = load_volume_metadata(VolumePaths(Path(output_dir), index).metadata)
    # the source that wrote the volume (a cache of the first version names none: the one the options locate)
    recorded = (metadata.configuration.fingerprint_inputs or {}).get("source") or {}
    name = recorded.get("source") if isinstance(recorded, dict) else None
    name = name or implied_source_name(vars(args))
    if name not in SOURCE_TYPES:
        raise SourceError(f"volume {index} was read from an unknown source ({name})")
    try:
        return SOURCE_TYPES[name].viewer_layers(metadata.source_dataset.to_dict(), vars(args))
    except SourceError as e:
        raise SourceError(f"volume {index}: {e}") from None


def reachable_source_layers(output_dir: Path, index: int, args) -> tuple[list[SourceLayer], SourceOrigin | None]:
    """source_layers, or none and one printed note when the source cannot be reached."""
    if not wants_source(args):
        return [], None
    try:
        return source_layers(output_dir, index, args)
    except (CacheToolError, OSError) as e:
        print(f"note: source data not shown ({str(e).splitlines()[0]}); showing the cached volume alone", flush=True)
        return [], None
