"""Which volumes of a cache a loader sees: the committed ones (metadata present, see
dinov3_cache.commit_protocol), each with its parsed metadata, never volumes made with different
configurations mixed silently; and the loader's errors, which name the volume."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from dinov3_cache.array_form import volume_index_problem
from dinov3_cache.commit_protocol import committed_volume_indices
from dinov3_cache.errors import CacheError
from dinov3_cache.indices import check_index, format_some
from dinov3_cache.loader.identity import FileIdentity, file_identity, identity_of
from dinov3_cache.paths import VolumePaths
from dinov3_cache.schema import MetadataError, VolumeMetadata, read_metadata_document


class VolumeReadError(CacheError):
    """Reading one array of one volume failed (one message argument, so that torch can
    re-raise it unchanged in the main process when a worker process hits it)."""


def volume_read_error(volume_index: int, array: str, path: Path, cause: str) -> VolumeReadError:
    return VolumeReadError(
        f"cannot read volume {volume_index} array '{array}' ({path}): {cause}; check the volume with "
        f"'check_preprocessing.py --output-dir {path.parent} --verify-indices {volume_index}' and recompute it "
        f"with 'preprocess_volume.py --volume-index {volume_index} --overwrite'"
    )


def volume_changed_error(volume: CachedVolume, what: str) -> VolumeReadError:
    return VolumeReadError(
        f"volume {volume.index} in {volume.paths.output_dir} was {what} while being read, so its values are not "
        "delivered; recreate the dataset (or dataloader) to load the volume as it is now"
    )


# ----------------------------------------------------------------------------- visible volumes


@dataclass(frozen=True)
class CachedVolume:
    """One committed volume: where its arrays are and what its metadata says."""

    paths: VolumePaths
    metadata: VolumeMetadata
    identity: FileIdentity  # of the metadata file `metadata` was parsed from

    @property
    def index(self) -> int:
        return self.paths.volume_index

    @property
    def fingerprint(self) -> str | None:
        return self.metadata.configuration.fingerprint

    @cached_property
    def metadata_dict(self) -> dict:
        """The metadata as the JSON document (what `return_metadata` hands out), built once
        per volume: it holds every chunk checksum, too much to rebuild per sample."""
        return self.metadata.to_dict()

    @property
    def has_mask(self) -> bool:
        return self.metadata.has_mask

    @property
    def features_shape(self) -> tuple[int, ...]:
        return tuple(self.metadata.shapes["features"])

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return self.features_shape[1:]

    @property
    def commit_id(self) -> str | None:
        return self.metadata.commit_id

    def recorded_checksums(self, array: str) -> dict[str, int]:
        integrity = self.metadata.integrity
        return (integrity.crc32.get(array) if integrity else None) or {}

    def array_path(self, array: str) -> Path:
        # the directory may have moved since the metadata was written: locate files by the layout
        return self.paths.located_array(array, self.commit_id)

    def current_identity(self, seen: FileIdentity) -> FileIdentity:
        """The identity of the metadata file now, given the one `seen` at an earlier check,
        when it still commits the arrays this volume was loaded with (the same commit id: at
        most its arrays moved to their seed names); else an error saying the volume was
        replaced or removed."""
        if file_identity(self.paths.metadata) == seen:
            return seen
        try:
            document, stat = read_metadata_document(self.paths.metadata)
            now = VolumeMetadata.from_dict(document, self.paths.metadata)
        except MetadataError as e:
            if self.paths.metadata.exists():
                raise volume_changed_error(self, f"replaced by a volume whose metadata is unreadable ({e})") from None
            raise volume_changed_error(self, "removed (its metadata file is gone)") from None
        commit_id = now.commit_id
        if self.commit_id is None or commit_id != self.commit_id:  # without commit ids any new metadata is another volume
            raise volume_changed_error(self, f"replaced (now commit {commit_id}, loaded as commit {self.commit_id})")
        return identity_of(stat)


def find_volumes(
    preprocessed_dir: Path | str,
    volume_indices: Sequence[int] | None = None,
    allow_mixed_configurations: bool = False,
) -> list[CachedVolume]:
    """The committed volumes to load, in the order asked (sorted when not given)."""
    root = Path(preprocessed_dir)
    try:
        if not root.is_dir():
            raise CacheError(f"preprocessed directory {root} does not exist; pass the --output-dir used for extraction")
        committed = committed_volume_indices(root)
    except PermissionError as e:
        raise CacheError(
            f"preprocessed directory {root} cannot be read ({e.strerror}: {e.filename}); "
            "give this user read and search permission on it, or pass another directory"
        ) from None
    if volume_indices is None:
        indices = committed
    else:
        if isinstance(volume_indices, (str, bytes)):
            raise CacheError(
                f"volume_indices must be a list of integers, got the string {volume_indices!r} "
                "(a string would be read digit by digit); write e.g. volume_indices=[12]"
            )
        indices = [check_index(int(i), "volume_indices") for i in volume_indices]
        missing = sorted(set(indices) - set(committed))
        if missing:
            raise CacheError(
                f"volumes {format_some(missing)} are not committed in {root} (no metadata file: missing, "
                "running or failed); run check_preprocessing.py to see gaps, or leave them out of volume_indices"
            )
    if not indices:
        raise CacheError(
            f"no preprocessed volumes found in {root} (no volume_XXXXXX_metadata.json); "
            "run preprocess_volume.py or check progress with check_preprocessing.py"
        )
    volumes = [CachedVolume(VolumePaths(root, i), *load_metadata(root, i)) for i in indices]
    if not allow_mixed_configurations:
        check_one_configuration(volumes)
    return volumes


def load_metadata(root: Path, index: int) -> tuple[VolumeMetadata, FileIdentity]:
    """The volume's parsed metadata and the identity of the file it was read from."""
    path = VolumePaths(root, index).metadata
    try:
        document, stat = read_metadata_document(path)
        metadata = VolumeMetadata.from_dict(document, path)
        if (wrong_index := volume_index_problem(metadata, index)) is not None:  # another volume's files
            raise MetadataError(f"{path}: {wrong_index}")
        return metadata, identity_of(stat)
    except MetadataError as e:
        raise CacheError(
            f"volume {index}: {e}; recompute it with 'preprocess_volume.py --volume-index {index} --overwrite'"
        ) from None


def check_one_configuration(volumes: Sequence[CachedVolume]) -> None:
    """Volumes extracted with different settings (model, geometry, dtype...) must not be mixed silently."""
    groups: dict[str | None, list[int]] = {}
    for volume in volumes:
        groups.setdefault(volume.fingerprint, []).append(volume.index)
    if len(groups) > 1:
        described = "; ".join(f"{fp}: volumes {format_some(ix)}" for fp, ix in groups.items())
        raise CacheError(
            f"volumes were extracted with {len(groups)} different configurations (fingerprint {described}); "
            "select one group with volume_indices, or pass allow_mixed_configurations=True"
        )
