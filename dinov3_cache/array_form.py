"""Whether a committed array is the one its volume's metadata describes, beyond its numbers:
how its bytes are laid out and encoded (order, compressor or codecs, filters, fill value, key
separator), and which volume it belongs to. The loader (reader.py) and the audit (verify.py)
apply these same rules, so a volume one refuses the other reports as damaged.

The expected document is the one the writer creates (`create_spec`, one definition), rebuilt
from the volume's recorded configuration; an array whose document differs would be decoded
differently (order F transposes every chunk) and deliver plausible but wrong values."""

from __future__ import annotations

from pathlib import Path

from dinov3_cache.schema import VolumeMetadata
from dinov3_cache.zarr_arrays import ArrayMetadata, StorageOptions, create_spec

# the members of an array's metadata document that decide how its chunk bytes decode
FORM_FIELDS = {2: ("order", "compressor", "filters", "fill_value", "dimension_separator"), 3: ("codecs", "fill_value", "chunk_grid")}


def expected_form(metadata: VolumeMetadata, name: str) -> dict | None:
    """The form fields the writer gave array `name` of this volume; None when the metadata
    does not record enough to rebuild them (an older cache)."""
    configuration = metadata.configuration
    shape, dtype = metadata.shapes.get(name), (metadata.dtypes or {}).get(name)
    chunks = metadata.integrity.chunks.get(name) if metadata.integrity else None
    if None in (configuration.zarr_format, configuration.compression, shape, dtype, chunks):
        return None
    storage = StorageOptions(zarr_format=configuration.zarr_format, compression=configuration.compression)
    spec = create_spec(Path(name), shape, dtype, chunks, storage, {}, [])["metadata"]
    return {key: spec.get(key) for key in FORM_FIELDS[storage.zarr_format]}


def form_problem(stored: ArrayMetadata, expected: dict | None) -> str | None:
    """The first form field on disk that differs from the expected one, said in one phrase."""
    if expected is None:
        return None
    for key, wanted in expected.items():
        found = stored.document.get(key)
        if not same_value(found, wanted):
            return f"'{key}' is {found!r} on disk, the volume's metadata implies {wanted!r}"
    return None


def same_value(found, wanted) -> bool:
    """Equal as JSON values, where an absent member and null (or an empty filter list) agree."""
    if not found and not wanted and found in (None, [], {}) and wanted in (None, [], {}):
        return True
    return found == wanted


def volume_index_problem(metadata: VolumeMetadata, index: int) -> str | None:
    """A volume's metadata file must be its own: a file copied over another index's names
    carries the other index (and its arrays the other index in their attributes)."""
    if metadata.volume_index != index:
        return f"its metadata says volume_index {metadata.volume_index}: the files were copied or renamed from another volume"
    return None


def array_owner_problem(attributes: dict, index: int) -> str | None:
    """The array's attributes must name the volume index its file names give."""
    owner = (attributes.get("dinov3_cache") or {}).get("volume_index")
    if owner is not None and owner != index:
        return f"the array was written for volume {owner} (its attributes say so), not volume {index}"
    return None
