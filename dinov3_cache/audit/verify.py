"""Verification: read every byte of a volume and check it against what the writer
recorded in the metadata (see extraction's volume metadata): shapes, dtypes, chunk shape,
the run's commit id in each array's attributes, that every chunk (zarr v2) or shard
(zarr v3) file exists, a crc32 of every chunk's decoded bytes, and NaN/Inf.

Imports numpy and TensorStore: the report imports this module only when verifying.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dinov3_cache.array_form import array_owner_problem, expected_form, form_problem, volume_index_problem
from dinov3_cache.chunk_files import ChunkFileMap, chunk_file_map, missing_written_chunks, present_files
from dinov3_cache.errors import first_line
from dinov3_cache.paths import VolumePaths
from dinov3_cache.schema import MetadataError, VolumeMetadata, load_volume_metadata
from dinov3_cache.zarr_arrays import (
    chunk_key,
    chunk_slices,
    crc32_of,
    open_array,
    read_array_metadata,
    read_attributes,
    ts_context,
)

MAX_PROBLEMS_PER_ARRAY = 20


@dataclass
class VolumeCheck:
    index: int
    ok: bool
    problems: list[str]
    arrays: dict[str, dict] = field(default_factory=dict)
    seconds: float = 0.0


def choose_volumes_to_verify(
    complete: list[int], sample_size: int | None, indices: list[int] | None, verify_all: bool, seed: int | None
) -> list[int]:
    chosen: set[int] = set(indices or [])
    if verify_all:
        chosen |= set(complete)
    elif sample_size:
        chosen |= set(random.Random(seed).sample(complete, min(sample_size, len(complete))))
    return sorted(chosen)


def verify_volume(output_dir: Path, index: int, num_threads: int = 8) -> VolumeCheck:
    """Check one volume's arrays against its metadata. Each problem names the volume,
    the array and, where it applies, the chunk and the file."""
    started = time.perf_counter()
    paths = VolumePaths(Path(output_dir), index)
    if not paths.metadata.is_file():
        return VolumeCheck(index, False, [f"{paths.name}: not complete (no {paths.metadata.name}); nothing to verify"])
    try:
        metadata = load_volume_metadata(paths.metadata)
    except MetadataError as e:
        return VolumeCheck(index, False, [f"{paths.name}: {e}"])
    problems = []
    wrong_index = volume_index_problem(metadata, index)
    if wrong_index is not None:
        problems.append(f"{paths.name}: damaged: {wrong_index}")
    if not metadata.is_intact:
        problems.append(f"{paths.name}: metadata file {paths.metadata} was edited after it was written (digest mismatch)")
    if metadata.integrity is None or not metadata.integrity.crc32:
        problems.append(f"{paths.name}: metadata records no chunk checksums (written by an older version?)")
    try:
        form = metadata.storage_form
    except MetadataError as e:
        return VolumeCheck(index, False, problems + [f"{paths.name}: {e}"])
    problems += [f"{paths.name}: {p}" for p in form.volume_problems(metadata)]
    context = ts_context(num_threads)
    arrays = {}
    for name in metadata.dtypes or {}:
        array_problems, arrays[name] = verify_array(paths, name, metadata, context)
        problems += array_problems
    if not metadata.dtypes:
        problems.append(f"{paths.name}: metadata lists no arrays (no 'dtypes')")
    return VolumeCheck(index, not problems, problems, arrays, round(time.perf_counter() - started, 3))


def _chunk_problems_limit(problems: list[str], where: str) -> list[str]:
    if len(problems) <= MAX_PROBLEMS_PER_ARRAY:
        return problems
    return problems[:MAX_PROBLEMS_PER_ARRAY] + [f"{where}: ... and {len(problems) - MAX_PROBLEMS_PER_ARRAY} more chunk problems"]


def verify_array(paths: VolumePaths, name: str, metadata: VolumeMetadata, context) -> tuple[list[str], dict]:
    path = paths.located_array(name, metadata.commit_id)
    where = f"{paths.name} {name}"
    info: dict[str, Any] = {"path": str(path)}
    if not path.is_dir():
        return [f"{where}: array {path} is missing"], info
    problems = []
    integrity = metadata.integrity
    try:  # the array's metadata document, parsed once here for all that follows
        store = open_array(path, context)
        array = read_array_metadata(path)
        open_error = None
    except Exception as e:  # TensorStore raises ValueError / RuntimeError with the reason
        store = array = None
        open_error = f"{where}: cannot open {path} ({first_line(e)})"
    try:
        attributes = read_attributes(path, array)
    except (OSError, ValueError) as e:
        problems.append(f"{where}: attributes of {path} are unreadable ({e})")
        attributes = {}
    problems += attribute_problems(where, name, attributes, metadata)
    if name == metadata.storage_form.array_name:
        problems += [f"{where}: {p}" for p in metadata.storage_form.attribute_problems(attributes, metadata)]
    owner = array_owner_problem(attributes, paths.volume_index)
    if owner is not None:
        problems.append(f"{where}: {owner}")
    if open_error is not None:
        return problems + [open_error], info
    shape, dtype = list(store.shape), str(store.dtype.numpy_dtype)
    info.update(shape=shape, dtype=dtype)
    chunks = array.chunks
    form_problems = []
    recorded_shape = metadata.shapes.get(name)
    if shape != list(recorded_shape or ()):
        form_problems.append(f"{where}: shape {shape} differs from the metadata's {recorded_shape and list(recorded_shape)}")
    if dtype != metadata.dtypes.get(name):
        form_problems.append(f"{where}: dtype {dtype} differs from the metadata's {metadata.dtypes.get(name)}")
    recorded_chunks = integrity.chunks.get(name) if integrity else None
    if recorded_chunks is not None and list(chunks) != list(recorded_chunks):
        form_problems.append(f"{where}: chunk shape {list(chunks)} differs from the metadata's {list(recorded_chunks)}")
    form = form_problem(array, expected_form(metadata, name))
    if form is not None:  # the chunks would decode to other values than the ones checksummed
        form_problems.append(f"{where}: array metadata of {path}: {form}")
    if form_problems:  # the recorded checksums describe another array: comparing them says nothing more
        return problems + form_problems, info

    file_map = chunk_file_map(array)
    files = present_files(path)  # the one listing of the array's files
    recorded = (integrity.crc32.get(name) if integrity else None) or {}
    written_but_missing = (  # files missing although a chunk of theirs held data; None: nothing recorded
        {file_map.chunk_file(g) for g in missing_written_chunks(array, file_map, files, recorded)} if recorded else None
    )
    missing_files, file_problems = set(), []
    for unit_index, _ in chunk_slices(shape, file_map.unit):
        key = file_map.file_key(unit_index)
        if key not in files:
            missing_files.add(key)
            if written_but_missing is None or key in written_but_missing:
                file_problems.append(f"{where}: chunk file {path / key} is missing (zarr would silently read zeros)")
        elif file_map.uncompressed_nbytes is not None and files[key] != file_map.uncompressed_nbytes:
            file_problems.append(
                f"{where}: chunk file {path / key} has {files[key]} bytes, expected {file_map.uncompressed_nbytes} (truncated?)"
            )
    problems += _chunk_problems_limit(file_problems, where)

    data_problems, stats = check_chunk_data(store, shape, file_map, missing_files, recorded, where, path)
    problems += _chunk_problems_limit(data_problems, where)
    info.update(stats, chunk_files=len(files), chunks=list(chunks))
    return problems, info


def attribute_problems(where: str, name: str, attributes: dict, metadata: VolumeMetadata) -> list[str]:
    """The array must come from the run that wrote the metadata, and sit where it says."""
    problems = []
    commit = (attributes.get("dinov3_cache") or {}).get("commit_id")
    expected = metadata.commit_id
    if commit != expected:
        problems.append(f"{where}: array was written by another run (commit id {commit}, metadata says {expected})")
    configuration = metadata.configuration
    voxel = (configuration.voxel_size_nm or {}).get("raw" if name == "raw" else "features")
    voxel = list(voxel) if voxel is not None else None
    if voxel is not None and attributes.get("voxel_size") not in (None, voxel):
        problems.append(f"{where}: voxel_size attribute {attributes.get('voxel_size')} differs from the metadata's {voxel}")
    offset = list(configuration.offset_nm) if configuration.offset_nm is not None else None
    if offset is not None and attributes.get("offset") not in (None, offset):
        problems.append(f"{where}: offset attribute {attributes.get('offset')} differs from the metadata's {offset}")
    return problems


def check_chunk_data(store, shape, file_map: ChunkFileMap, missing_files, recorded, where, path):
    """Read slabs (chunk-sized along leading axes, whole along the last two), compare each
    chunk's crc32 with the recorded one and count NaN/Inf. Where a slab cannot be read,
    read its chunks one by one to name the damaged ones."""
    problems: list[str] = []
    chunks = file_map.chunks
    floating = store.dtype.numpy_dtype.kind == "f" or str(store.dtype.numpy_dtype) == "bfloat16"
    stats = {"chunks_checked": 0, "chunks_without_checksum": 0, "non_finite": 0}
    lead = len(shape) - 2
    slab_chunks = tuple(chunks[:lead]) + tuple(shape[lead:])

    def check(grid_index, block) -> None:
        key = chunk_key(grid_index)
        if floating:
            bad = int(np.count_nonzero(~np.isfinite(block)))
            if bad:
                stats["non_finite"] += bad
                problems.append(f"{where}: chunk {key} holds {bad} NaN/Inf values")
        if file_map.chunk_file(grid_index) in missing_files:
            return
        if key not in recorded:
            stats["chunks_without_checksum"] += 1
            problems.append(f"{where}: chunk {key} has no recorded checksum")
            return
        found = crc32_of(block)
        stats["chunks_checked"] += 1
        if found != int(recorded[key]):
            problems.append(
                f"{where}: chunk {key} crc32 {found} differs from the recorded {recorded[key]} "
                f"(file {path / file_map.chunk_file(grid_index)})"
            )

    for slab_index, slab_region in chunk_slices(shape, slab_chunks):
        try:
            slab = store[slab_region].read().result()
        except Exception:
            slab = None
        for local_index, local in chunk_slices([s.stop - s.start for s in slab_region], chunks):
            grid_index = tuple(si * (sc // c) + li for si, sc, c, li in zip(slab_index, slab_chunks, chunks, local_index, strict=True))
            if slab is not None:
                check(grid_index, slab[local])
                continue
            region = tuple(slice(r.start + part.start, r.start + part.stop) for r, part in zip(slab_region, local, strict=True))
            try:
                check(grid_index, store[region].read().result())
            except Exception as e:
                problems.append(
                    f"{where}: chunk {chunk_key(grid_index)} cannot be read ({first_line(e)}) "
                    f"(file {path / file_map.chunk_file(grid_index)})"
                )
    return problems, stats

