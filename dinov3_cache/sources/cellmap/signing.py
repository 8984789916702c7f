"""Signatures of CellMap reads: per array read, digests of its metadata documents (the level's
.zarray/.zattrs, zarr.json or attributes.json, and its multiscale group's attributes) and, per
storage chunk the read touched, the chunk's identity and a digest of the values the crop took
from it; and the re-check of such a signature against the data now.

Chunk identity: a local file's size, mtime (ns) and sha256 (hashed on threads; the file was
just read, so it is in the page cache); an S3 object's size and ETag (from listings of the
chunk keys' common prefixes, one request per plane or row of chunks, not one per chunk); an
absent chunk (the fill value) as size null. The re-check compares size and mtime (S3: the ETag)
first and hashes a local file only where they differ; where a chunk's bytes differ it reads the
crop's values from that chunk and compares their digest, so a change elsewhere in the chunk is
no change of the volume. One `Snapshot` serves a whole check: every volume reading the same
array shares its metadata documents and listings.
"""

from __future__ import annotations

import functools
import itertools
import math
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


@functools.cache
def io_pool() -> ThreadPoolExecutor:
    """Threads for hashing and S3 listings, started once per process (a pool per call costs more than the hashing)."""
    return ThreadPoolExecutor(IO_THREADS, thread_name_prefix="source-signature")


# ----------------------------------------------------------------------------- metadata and chunk grid


def read_documents(array_url: str, group_url: str, driver: str, storage: Storage) -> dict[str, dict | None]:
    """The array's and its group's metadata documents, named 'array/<file>' and 'group/<file>'."""
    if driver not in ARRAY_DOCUMENTS:
        raise SignatureError(f"source signature names driver {driver!r}, which no CellMap array has; the metadata is damaged")
    documents = {f"array/{name}": storage.read_json(join_url(array_url, name)) for name in ARRAY_DOCUMENTS[driver]}
    documents |= {f"group/{name}": storage.read_json(join_url(group_url, name)) for name in GROUP_DOCUMENTS[driver]}
    return documents


LIST_PAGE = 1000  # keys per S3 listing page


@dataclass(frozen=True)
class ChunkGrid:
    """Storage chunks (zarr v3: shards, the files) in metadata (C) order, and how keys name them."""

    shape: tuple[int, ...]  # chunk shape, C order
    counts: tuple[int, ...]  # chunks along each axis, C order
    separator: str
    prefix: str  # 'c' + separator for zarr v3 default keys
    key_axes: tuple[int, ...]  # the C axis of each key component, in key order

    def key(self, grid_index: list[int]) -> str:
        return self.prefix + self.separator.join(str(grid_index[a]) for a in self.key_axes)

    def listing_prefix(self, key: str) -> str:
        """The prefix listing this chunk with its neighbours: every chunk of the array where
        they fit one listing page, else its plane of chunks where that fits, else its row."""
        if math.prod(self.counts) < LIST_PAGE:  # '<': the page also lists the metadata objects
            return self.prefix
        plane = self.counts[self.key_axes[-1]] * self.counts[self.key_axes[-2]]
        drop = 2 if plane <= LIST_PAGE else 1
        return self.separator.join(key.split(self.separator)[:-drop]) + self.separator


def chunk_grid(driver: str, document: dict, where: str) -> ChunkGrid:
    try:
        if driver == "n5":  # N5 lists dimensions fastest-first; keys name them in that order
            shape, chunks, separator, prefix, key_axes = document["dimensions"][::-1], document["blockSize"][::-1], "/", "", (2, 1, 0)
        elif driver == "zarr":
            shape, chunks, separator, prefix, key_axes = document["shape"], document["chunks"], document.get("dimension_separator") or ".", "", (0, 1, 2)
        else:
            encoding = document.get("chunk_key_encoding") or {"name": "default"}
            separator = (encoding.get("configuration") or {}).get("separator") or ("." if encoding["name"] == "v2" else "/")
            prefix = "c" + separator if encoding["name"] == "default" else ""
            shape, chunks, key_axes = document["shape"], document["chunk_grid"]["configuration"]["chunk_shape"], (0, 1, 2)
        counts = tuple(-(-int(n) // int(c)) for n, c in zip(shape, chunks))
        return ChunkGrid(tuple(int(c) for c in chunks), counts, separator, prefix, key_axes)
    except (KeyError, TypeError, AttributeError, ValueError, ZeroDivisionError):
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


def local_identity(path: str, with_hash: bool = True) -> dict:
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return {"size": None}
    identity = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    return identity | {"sha256": file_sha256(path)} if with_hash else identity


class Snapshot:
    """The source as one signing or one check sees it: metadata documents and S3 listings are
    read once and shared by every volume reading the same array."""

    def __init__(self, storage: Storage):
        self.storage = storage
        self._documents: dict[tuple[str, str, str], dict | SourceError] = {}
        self._listings: dict[str, dict[str, dict]] = {}
        self._client = None

    def documents(self, array_url: str, group_url: str, driver: str) -> dict[str, dict | None]:
        key = (array_url, group_url, driver)
        if key not in self._documents:
            try:
                self._documents[key] = read_documents(array_url, group_url, driver, self.storage)
            except SourceError as e:  # unreachable once is unreachable for every volume: no retries per volume
                self._documents[key] = e
        found = self._documents[key]
        if isinstance(found, SourceError):
            raise found
        return found

    def identities(self, array_url: str, grid: ChunkGrid, keys: list[str], with_hash: bool) -> list[dict]:
        """Each chunk's identity: a local file's size and mtime (and sha256 with_hash), an S3 object's size and ETag."""
        if is_s3(array_url):
            prefixes = sorted({grid.listing_prefix(k) for k in keys})
            self._client = self._client or self.storage._s3_client()  # made once, shared by the threads
            if len(prefixes) > 1:  # the listings at once: one round trip's latency, not one per prefix
                list(io_pool().map(lambda prefix: self._listing(array_url, prefix), prefixes))
            return [self._listing(array_url, grid.listing_prefix(k)).get(k, {"size": None}) for k in keys]
        paths = [os.path.join(array_url, *k.split("/")) for k in keys]
        if not with_hash:
            return [local_identity(path, False) for path in paths]
        return list(io_pool().map(local_identity, paths))  # hashlib releases the GIL

    def _listing(self, array_url: str, prefix: str) -> dict[str, dict]:
        """Size and ETag of every object under array_url/prefix, by chunk key."""
        url = join_url(array_url, prefix) + ("/" if prefix.endswith("/") else "")
        if url not in self._listings:
            import botocore.exceptions as bex

            bucket, array_key = split_s3(array_url)
            full = f"{array_key}/{prefix}"
            self._client = self._client or self.storage._s3_client()
            found = {}
            try:
                for page in self._client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=full):
                    for entry in page.get("Contents", []):
                        found[entry["Key"][len(array_key) + 1:]] = {"size": entry["Size"], "etag": entry["ETag"].strip('"')}
            except bex.ClientError as e:
                raise SourceError(f"cannot list {url} ({e.response.get('Error', {}).get('Code', 'error')})") from None
            except bex.BotoCoreError as e:
                raise SourceError(f"cannot reach the S3 endpoint {self.storage.s3.where()} for {url} ({e})") from None
            self._listings[url] = found
        return self._listings[url]


# ----------------------------------------------------------------------------- signing


def as_slices(positions: tuple[np.ndarray, ...]) -> tuple:
    """Positions per axis as slices where they are runs (always for raw): a view, not a copy."""
    return tuple(slice(int(p[0]), int(p[-1]) + 1) if p[-1] - p[0] + 1 == len(p) else p for p in positions)


def region_values(values: np.ndarray, positions: tuple[np.ndarray, ...]) -> np.ndarray:
    chosen = as_slices(positions)
    if all(isinstance(c, slice) for c in chosen):
        return values[chosen]
    return values[np.ix_(*positions)]


def sign_array(piece: ReadPiece | None, array: LevelArray, snapshot: Snapshot) -> dict:
    """The signature of one array read (piece None: the crop took no voxel from it)."""
    multiscale = array.multiscale
    documents = snapshot.documents(array.url, multiscale.url, multiscale.driver)
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
    # the values' digests on the pool too, while the files are hashed
    digests = [io_pool().submit(values_digest, region_values(piece.values, positions)) for _, positions in touched]
    found = snapshot.identities(array.url, grid, [key for key, _ in touched], with_hash=True)
    record["chunks"] = {key: identity | {"values_sha256": digest.result()} for (key, _), identity, digest in zip(touched, found, digests)}
    record["selection"] = [encode_axis(axis) for axis in piece.axes]
    return record


def sign_reads(arrays: dict[str, LevelArray], pieces: dict[str, ReadPiece | None], snapshot: Snapshot) -> dict:
    """The 'arrays' of a CellMap signature: one record per array read ('raw', organelles)."""
    return {role: sign_array(pieces.get(role), array, snapshot) for role, array in arrays.items()}


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


def check_array(role: str, record: dict, snapshot: Snapshot, move: Callable[[str], str], where: str) -> SourceStatus:
    """Compare one array's record with the array now: metadata documents, then chunk identities,
    then (for chunks whose bytes differ) the values the crop read."""
    url, group = move(field_of(record, "url", str, where)), move(field_of(record, "group", str, where))
    driver = field_of(record, "driver", str, where)
    recorded_docs = field_of(record, "metadata", dict, where)
    chunks = field_of(record, "chunks", dict, where)
    if not all(isinstance(entry, dict) for entry in chunks.values()):
        raise SignatureError(f"{where}: a source signature chunk entry is not an object; the metadata is damaged")
    try:
        documents = snapshot.documents(url, group, driver)
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
        return compare_chunks(role, record, chunks, url, group, documents[main], snapshot, where)
    except SourceError as e:
        return SourceStatus(UNREACHABLE, f"{role}: {e}")


def compare_chunks(role: str, record: dict, chunks: dict, url: str, group: str, document: dict, snapshot: Snapshot, where: str) -> SourceStatus:
    keys = sorted(chunks)
    grid = chunk_grid(field_of(record, "driver", str, where), document, url)
    now = snapshot.identities(url, grid, keys, with_hash=False)
    undecided = [k for k, identity in zip(keys, now) if same_chunk(chunks[k], identity) is None]
    hashed = dict(zip(undecided, snapshot.identities(url, grid, undecided, with_hash=True)))
    differing = [
        k for k, identity in zip(keys, now)
        if (same_chunk(chunks[k], identity) is False) or (k in hashed and hashed[k].get("sha256") != chunks[k].get("sha256"))
    ]
    status = SourceStatus(CURRENT, chunks_compared=len(keys), chunks_hashed=len(hashed))
    if not differing:
        return status
    inside = values_differ(record, chunks, differing, url, group, grid, snapshot.storage, where)
    outside = [k for k in differing if k not in inside]
    status.changed_outside = len(outside)
    if inside:
        status.status = STALE
        status.changes.append(Change(role, "chunks", inside, True))
    if outside:
        status.changes.append(Change(role, "chunks", outside, False))
    return status


def values_differ(record: dict, chunks: dict, keys: list[str], url: str, group: str, grid: ChunkGrid, storage: Storage, where: str) -> list[str]:
    """The chunks among keys whose values, where the crop read them, differ from the recorded ones."""
    axes = [decode_axis(a, where) for a in field_of(record, "selection", list, where)]
    axis_order = tuple(field_of(record, "axis_order", list, where))
    if len(axes) != 3 or sorted(axis_order) != [0, 1, 2]:
        raise SignatureError(f"{where}: a source signature selection or axis order is not three axes; the metadata is damaged")
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
                values = array.store.oindex[tuple(axes[a][positions[a]] for a in range(3))].read().result()  # only this chunk
            except (ValueError, RuntimeError) as e:
                raise storage_error(join_url(url, key), e, storage.s3) from None
            if values_digest(values) != chunks[key].get("values_sha256"):
                differ.append(key)
    return differ
