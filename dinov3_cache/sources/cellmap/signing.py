"""Signatures of CellMap reads: per array read, digests of its metadata documents (the level's
.zarray/.zattrs, zarr.json or attributes.json, and its multiscale group's attributes) and, per
storage chunk the read touched, the chunk's identity and a digest of the values the crop took
from it; and the re-check of such a signature against the data now.

Chunk identity: a local file's size, mtime (ns) and sha256 (hashed on threads while the crop is
in memory anyway); an S3 object's size and ETag (one HEAD request per chunk); an absent chunk
(the fill value) as size null. The re-check compares size and mtime (S3: the ETag) first and
hashes a local file only where they differ; where a chunk's bytes differ it reads the crop's
values from that chunk and compares their digest, so a change elsewhere in the chunk is no
change of the volume.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from dinov3_cache.sources.base import SourceError
from dinov3_cache.sources.cellmap.ome_ngff import LevelArray, open_level_array, read_multiscale
from dinov3_cache.sources.cellmap.reading import ReadPiece
from dinov3_cache.sources.cellmap.store import Storage, is_s3, join_url, split_s3, storage_error
from dinov3_cache.sources.signatures import (
    CURRENT,
    STALE,
    UNREACHABLE,
    Change,
    SignatureError,
    SourceStatus,
    document_digest,
    field_of,
    file_sha256,
    values_digest,
)

# the metadata documents of a level array and of its multiscale group, per driver; the first is the array's own
ARRAY_DOCUMENTS = {"zarr": (".zarray", ".zattrs"), "zarr3": ("zarr.json",), "n5": ("attributes.json",)}
GROUP_DOCUMENTS = {"zarr": (".zattrs",), "zarr3": ("zarr.json",), "n5": ("attributes.json",)}
IO_THREADS = 8


# ----------------------------------------------------------------------------- metadata and chunk grid


def read_documents(array_url: str, group_url: str, driver: str, storage: Storage) -> dict[str, dict | None]:
    """The array's and its group's metadata documents, named 'array/<file>' and 'group/<file>'."""
    if driver not in ARRAY_DOCUMENTS:
        raise SignatureError(f"source signature names driver {driver!r}, which no CellMap array has; the metadata is damaged")
    documents = {f"array/{name}": storage.read_json(join_url(array_url, name)) for name in ARRAY_DOCUMENTS[driver]}
    documents |= {f"group/{name}": storage.read_json(join_url(group_url, name)) for name in GROUP_DOCUMENTS[driver]}
    return documents


@dataclass(frozen=True)
class ChunkGrid:
    """Storage chunks (zarr v3: shards, the files) in metadata (C) order, and each one's key."""

    shape: tuple[int, ...]
    key: Callable[[list[int]], str]


def chunk_grid(driver: str, document: dict, where: str) -> ChunkGrid:
    try:
        if driver == "n5":  # N5 lists dimensions fastest-first; keys name them in that order
            return ChunkGrid(tuple(document["blockSize"][::-1]), lambda g: "/".join(map(str, g[::-1])))
        if driver == "zarr":
            separator = document.get("dimension_separator") or "."
            return ChunkGrid(tuple(document["chunks"]), lambda g: separator.join(map(str, g)))
        encoding = document.get("chunk_key_encoding") or {"name": "default"}
        separator = (encoding.get("configuration") or {}).get("separator") or ("." if encoding["name"] == "v2" else "/")
        prefix = "c" + separator if encoding["name"] == "default" else ""
        return ChunkGrid(tuple(document["chunk_grid"]["configuration"]["chunk_shape"]), lambda g: prefix + separator.join(map(str, g)))
    except (KeyError, TypeError, AttributeError):
        raise SourceError(f"cannot tell the chunk grid of {where} from its metadata") from None


def touched_chunks(axes: list[np.ndarray], axis_order: tuple[int, ...], grid: ChunkGrid) -> Iterator[tuple[str, tuple[np.ndarray, ...]]]:
    """Each chunk the selection (level voxels per axis z, y, x) touches: its key and the
    positions, per axis, of the selected voxels it holds."""
    per_axis = []
    for a in range(3):
        held_by = np.asarray(axes[a]) // grid.shape[axis_order[a]]
        per_axis.append([(int(k), np.nonzero(held_by == k)[0]) for k in np.unique(held_by)])
    for combination in itertools.product(*per_axis):
        grid_index = [0] * 3
        for a, (k, _) in enumerate(combination):
            grid_index[axis_order[a]] = k
        yield grid.key(grid_index), tuple(positions for _, positions in combination)


def encode_axis(indices: np.ndarray) -> dict | list[int]:
    """A selected axis as {start, stop, step} where it is regular, else the list of voxels."""
    indices = np.asarray(indices, np.int64)
    step = int(indices[1] - indices[0]) if len(indices) > 1 else 1
    if step > 0 and np.array_equal(indices, indices[0] + step * np.arange(len(indices))):
        return {"start": int(indices[0]), "stop": int(indices[-1]) + 1, "step": step}
    return [int(i) for i in indices]


def decode_axis(encoded: object, where: str) -> np.ndarray:
    if isinstance(encoded, dict):
        return np.arange(field_of(encoded, "start", int, where), field_of(encoded, "stop", int, where), field_of(encoded, "step", int, where))
    if isinstance(encoded, list) and all(isinstance(i, int) for i in encoded):
        return np.asarray(encoded, np.int64)
    raise SignatureError(f"{where}: a source signature selection is malformed; the metadata is damaged")


# ----------------------------------------------------------------------------- chunk identities


def chunk_location(array_url: str, key: str) -> str:
    return join_url(array_url, key) if is_s3(array_url) else os.path.join(array_url, *key.split("/"))


def local_identity(path: str, with_hash: bool = True) -> dict:
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return {"size": None}
    identity = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    return identity | {"sha256": file_sha256(path)} if with_hash else identity


def s3_identity(client, url: str) -> dict:
    import botocore.exceptions as bex

    bucket, key = split_s3(url)
    try:
        head = client.head_object(Bucket=bucket, Key=key)
    except bex.ClientError as e:
        if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return {"size": None}
        raise SourceError(f"cannot read {url} ({e.response.get('Error', {}).get('Code', 'error')})") from None
    except bex.BotoCoreError as e:
        raise SourceError(f"cannot reach the S3 endpoint for {url} ({e})") from None
    return {"size": head["ContentLength"], "etag": head["ETag"].strip('"')}


def identities(urls: list[str], storage: Storage, with_hash: bool = True) -> list[dict]:
    """The identity of each chunk, on threads (hashing and HEAD requests release the GIL)."""
    if not urls:
        return []
    if is_s3(urls[0]):
        client = storage._s3_client()
        one = lambda url: s3_identity(client, url)  # noqa: E731
    else:
        one = lambda path: local_identity(path, with_hash)  # noqa: E731
    with ThreadPoolExecutor(min(IO_THREADS, len(urls))) as pool:
        return list(pool.map(one, urls))


# ----------------------------------------------------------------------------- signing


def sign_array(piece: ReadPiece | None, array: LevelArray, storage: Storage) -> dict:
    """The signature of one array read (piece None: the crop took no voxel from it)."""
    multiscale = array.multiscale
    documents = read_documents(array.url, multiscale.url, multiscale.driver, storage)
    record = {
        "url": array.url, "group": multiscale.url, "level": array.level.path, "driver": multiscale.driver,
        "axis_order": list(multiscale.axis_order),
        "metadata": {name: document_digest(doc) for name, doc in documents.items()},
        "selection": None, "chunks": {},
    }
    if piece is None:
        return record
    grid = chunk_grid(multiscale.driver, documents[f"array/{ARRAY_DOCUMENTS[multiscale.driver][0]}"] or {}, array.url)
    touched = list(touched_chunks(list(piece.axes), multiscale.axis_order, grid))
    found = identities([chunk_location(array.url, key) for key, _ in touched], storage)
    record["selection"] = [encode_axis(axis) for axis in piece.axes]
    record["chunks"] = {
        key: identity | {"values_sha256": values_digest(piece.values[np.ix_(*positions)])}
        for (key, positions), identity in zip(touched, found)
    }
    return record


def sign_reads(arrays: dict[str, LevelArray], pieces: dict[str, ReadPiece | None], storage: Storage) -> dict:
    """The 'arrays' of a CellMap signature: one record per array read ('raw', organelles)."""
    return {role: sign_array(pieces.get(role), array, storage) for role, array in arrays.items()}


# ----------------------------------------------------------------------------- checking


def rebased(url: str, recorded_root: str | None, root: str | None) -> str:
    """A recorded URL under the data root given now (the data moved with its root)."""
    if recorded_root and root and recorded_root != root and url.startswith(recorded_root.rstrip("/") + "/"):
        return root.rstrip("/") + url[len(recorded_root.rstrip("/")):]
    return url


def same_chunk(recorded: dict, now: dict) -> bool | None:
    """True/False where size and mtime (S3: ETag) decide; None where only the content can."""
    if recorded.get("size") is None or now.get("size") is None:
        return recorded.get("size") == now.get("size")
    if "etag" in recorded:
        return recorded["etag"] == now.get("etag")
    if recorded["size"] != now["size"]:
        return False
    return True if recorded.get("mtime_ns") == now.get("mtime_ns") else None


def check_array(role: str, record: dict, storage: Storage, move: Callable[[str], str], where: str) -> SourceStatus:
    """Compare one array's record with the array now: metadata documents, then chunk identities,
    then (for chunks whose bytes differ) the values the crop read."""
    url, group = move(field_of(record, "url", str, where)), move(field_of(record, "group", str, where))
    driver = field_of(record, "driver", str, where)
    recorded_docs = field_of(record, "metadata", dict, where)
    chunks = field_of(record, "chunks", dict, where)
    try:
        documents = read_documents(url, group, driver, storage)
    except SourceError as e:
        return SourceStatus(UNREACHABLE, f"{role}: {e}")
    main = f"array/{ARRAY_DOCUMENTS[driver][0]}"
    if documents[main] is None:
        return SourceStatus(UNREACHABLE, f"{role}: the source array {url} is gone (no {ARRAY_DOCUMENTS[driver][0]})")
    changed_docs = sorted(n for n in recorded_docs if document_digest(documents.get(n)) != recorded_docs[n])
    if changed_docs:
        return SourceStatus(STALE, changes=[Change(role, "metadata", changed_docs, True)])
    if not chunks:
        return SourceStatus(CURRENT)
    try:
        return compare_chunks(role, record, chunks, url, group, documents[main], storage, where)
    except SourceError as e:
        return SourceStatus(UNREACHABLE, f"{role}: {e}")


def compare_chunks(role: str, record: dict, chunks: dict, url: str, group: str, document: dict, storage: Storage, where: str) -> SourceStatus:
    keys = sorted(chunks)
    now = identities([chunk_location(url, k) for k in keys], storage, with_hash=False)
    undecided = [k for k, identity in zip(keys, now) if same_chunk(chunks[k], identity) is None]
    hashed = dict(zip(undecided, identities([chunk_location(url, k) for k in undecided], storage))) if undecided else {}
    differing = [
        k for k, identity in zip(keys, now)
        if (same_chunk(chunks[k], identity) is False) or (k in hashed and hashed[k].get("sha256") != chunks[k].get("sha256"))
    ]
    status = SourceStatus(CURRENT, chunks_compared=len(keys), chunks_hashed=len(hashed))
    if not differing:
        return status
    inside = values_differ(record, chunks, differing, url, group, document, storage, where)
    outside = [k for k in differing if k not in inside]
    status.changed_outside = len(outside)
    if inside:
        status.status = STALE
        status.changes.append(Change(role, "chunks", inside, True))
    if outside:
        status.changes.append(Change(role, "chunks", outside, False))
    return status


def values_differ(record: dict, chunks: dict, keys: list[str], url: str, group: str, document: dict, storage: Storage, where: str) -> list[str]:
    """The chunks among keys whose values, where the crop read them, differ from the recorded ones."""
    axes = [decode_axis(a, where) for a in field_of(record, "selection", list, where)]
    axis_order = tuple(field_of(record, "axis_order", list, where))
    grid = chunk_grid(field_of(record, "driver", str, where), document, url)
    multiscale = read_multiscale(group, storage)
    level = next((lv for lv in multiscale.levels if lv.path == record.get("level")), None)
    if level is None:
        raise SourceError(f"level {record.get('level')} is no longer listed in {group}")
    array = open_level_array(multiscale, level, False, storage)
    wanted = set(keys)
    differ = []
    for key, positions in touched_chunks(axes, axis_order, grid):
        if key in wanted:
            try:
                values = array.store.oindex[tuple(axes[a][positions[a]] for a in range(3))].read().result()
            except (ValueError, RuntimeError) as e:
                raise storage_error(join_url(url, key), e, storage.s3) from None
            if values_digest(values) != chunks[key].get("values_sha256"):
                differ.append(key)
    return differ
