"""Zarr arrays through TensorStore: specs, codecs, attributes and chunk checksums.

One place decides how an array is laid out on disk (zarr v2 or v3, chunks, shards,
codecs) and how it is opened again, so the writer, the audit and the loader agree.
"""

from __future__ import annotations

import itertools
import json
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorstore as ts

from dinov3_cache.errors import CacheToolError

COMPRESSIONS = ("none", "lz4", "zstd")
ZARR_FORMATS = (2, 3)
DEFAULT_LABEL_CHUNKS = (32, 32, 32)
DEFAULT_RAW_CHUNKS = (64, 64, 64)
SHARD_CHUNKS_PER_AXIS = 4  # zarr v3: a shard holds 4^3 chunks spatially
CHECKSUM_ALGORITHM = "crc32 (zlib) of each chunk's decoded C-order bytes, edge chunks cropped"


class StorageError(CacheToolError, ValueError):
    """Bad storage options; one actionable line."""


@dataclass(frozen=True)
class StorageOptions:
    zarr_format: int = 2
    compression: str = "none"
    feature_chunks: tuple[int, ...] | None = None  # None: the storage form's default_chunks (dinov3_cache/storage)
    num_threads: int = 8

    def __post_init__(self) -> None:
        if self.zarr_format not in ZARR_FORMATS:
            raise StorageError(f"--zarr-format must be 2 or 3, got {self.zarr_format}")
        if self.compression not in COMPRESSIONS:
            raise StorageError(f"--compression must be one of {', '.join(COMPRESSIONS)}, got {self.compression!r}")
        if self.feature_chunks is not None and (len(self.feature_chunks) != 4 or any(int(c) <= 0 for c in self.feature_chunks)):
            raise StorageError(f"--chunks needs 4 positive integers, got {list(self.feature_chunks)}")
        if self.num_threads <= 0:
            raise StorageError(f"--num-threads must be positive, got {self.num_threads}")


def parse_chunks(text: str | None) -> tuple[int, ...] | None:
    """'256,16,16,16' or '256 16 16 16' -> (256, 16, 16, 16); None or 'auto': the storage form's default."""
    if text is None or text.strip() == "auto":
        return None
    try:
        chunks = tuple(int(p) for p in text.replace(",", " ").split())
    except ValueError:
        raise StorageError(f"--chunks needs 4 positive integers (or auto), got {text!r}") from None
    StorageOptions(feature_chunks=chunks)
    return chunks


def clamp_chunks(shape: Sequence[int], chunks: Sequence[int]) -> tuple[int, ...]:
    return tuple(min(int(c), int(s)) for c, s in zip(chunks, shape))


def feature_chunks(shape: Sequence[int], requested: Sequence[int]) -> tuple[int, ...]:
    """Feature chunks for a (C, D, H, W) array: spatial sizes clamped to the array, and the
    channel chunk the largest divisor of C not above the request, so that no channel chunk
    is padded (C = 384 with 256 asked gives 192)."""
    c = min(int(requested[0]), int(shape[0]))
    while shape[0] % c:
        c -= 1
    return (c, *clamp_chunks(shape[1:], requested[1:]))


def shard_shape(shape: Sequence[int], chunks: Sequence[int], spatial_axes: int = 3) -> tuple[int, ...]:
    """Zarr v3 shard: the channel chunk, SHARD_CHUNKS_PER_AXIS chunks along each spatial axis
    (fewer when the array is smaller). Always a whole number of chunks, as zarr v3 requires:
    48 voxels in chunks of 32 make a shard of 64 (the array's edge cuts it)."""
    lead = len(shape) - spatial_axes
    return tuple(
        c if i < lead else c * min(-(-s // c), SHARD_CHUNKS_PER_AXIS) for i, (s, c) in enumerate(zip(shape, chunks))
    )


def write_unit(shape: Sequence[int], chunks: Sequence[int], zarr_format: int) -> tuple[int, ...]:
    """The block size a writer should fill whole, so no chunk or shard is written twice."""
    return shard_shape(shape, chunks) if zarr_format == 3 else tuple(chunks)


def ts_context(num_threads: int) -> ts.Context:
    return ts.Context(
        {
            "data_copy_concurrency": {"limit": num_threads},
            "file_io_concurrency": {"limit": num_threads},
        }
    )


def dtype_itemsize(dtype: str) -> int:
    """Bytes per element (numpy has no bfloat16: it is 2)."""
    return 2 if dtype == "bfloat16" else np.dtype(dtype).itemsize


# lz4 goes through blosc with byte shuffle over elements of the array's itemsize (bytes of
# equal significance together), the same in both formats; zstd compresses the plain bytes.
def _v2_compressor(compression: str) -> dict | None:
    """zarr v2 keeps no blosc typesize: readers (numcodecs, TensorStore) take it from the dtype."""
    if compression == "none":
        return None
    if compression == "lz4":
        return {"id": "blosc", "cname": "lz4", "clevel": 3, "shuffle": 1, "blocksize": 0}
    return {"id": "zstd", "level": 3}


def _v3_codecs(compression: str, dtype: str, chunks: Sequence[int], shard: Sequence[int]) -> list[dict]:
    """The codec chain as TensorStore writes it to zarr.json (so the metadata records what is on disk)."""
    # single-byte types have no byte order to record
    inner = [{"name": "bytes", "configuration": {"endian": "little"}} if dtype_itemsize(dtype) > 1 else {"name": "bytes"}]
    if compression == "lz4":
        inner.append({"name": "blosc", "configuration": {
            "cname": "lz4", "clevel": 3, "shuffle": "shuffle", "typesize": dtype_itemsize(dtype), "blocksize": 0}})
    elif compression == "zstd":
        inner.append({"name": "zstd", "configuration": {"level": 3, "checksum": False}})
    inner.append({"name": "crc32c"})
    if tuple(chunks) == tuple(shard):
        return inner
    return [
        {
            "name": "sharding_indexed",
            "configuration": {
                "chunk_shape": list(chunks),
                "codecs": inner,
                "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}],
            },
        }
    ]


def codec_description(storage: StorageOptions, shape: Sequence[int], chunks: Sequence[int], dtype: str) -> dict:
    """Recorded in metadata: how an array's bytes on disk are encoded."""
    if storage.zarr_format == 2:
        compressor = _v2_compressor(storage.compression)
        if compressor and compressor["id"] == "blosc":  # what readers take from the dtype, made explicit
            compressor = {**compressor, "typesize": dtype_itemsize(dtype)}
        return {"zarr_format": 2, "compressor": compressor}
    return {"zarr_format": 3, "codecs": _v3_codecs(storage.compression, dtype, chunks, shard_shape(shape, chunks))}


def create_spec(
    path: Path,
    shape: Sequence[int],
    dtype: str,
    chunks: Sequence[int],
    storage: StorageOptions,
    attributes: dict,
    dimension_names: Sequence[str],
) -> dict:
    chunks = clamp_chunks(shape, chunks)
    kvstore = {"driver": "file", "path": str(path)}
    if storage.zarr_format == 2:
        metadata = {
            "shape": list(shape),
            "chunks": list(chunks),
            "dtype": numpy_zarr2_dtype(dtype),
            "compressor": _v2_compressor(storage.compression),
            "fill_value": 0,
            "order": "C",
            "dimension_separator": ".",
        }
        return {"driver": "zarr", "kvstore": kvstore, "metadata": metadata, "create": True, "delete_existing": True}
    shard = shard_shape(shape, chunks)
    metadata = {
        "shape": list(shape),
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(shard)}},
        "data_type": dtype,
        "fill_value": 0,
        "codecs": _v3_codecs(storage.compression, dtype, chunks, shard),
        "dimension_names": list(dimension_names),
        "attributes": attributes,
    }
    return {"driver": "zarr3", "kvstore": kvstore, "metadata": metadata, "create": True, "delete_existing": True}


def numpy_zarr2_dtype(dtype: str) -> str:
    """zarr v2 dtype string; bfloat16 is TensorStore's extension (zarr-python cannot read it)."""
    return "bfloat16" if dtype == "bfloat16" else np.dtype(dtype).newbyteorder("<").str


def create_array(
    path: Path,
    shape: Sequence[int],
    dtype: str,
    chunks: Sequence[int],
    storage: StorageOptions,
    context: ts.Context,
    attributes: dict,
    dimension_names: Sequence[str],
) -> ts.TensorStore:
    spec = create_spec(path, shape, dtype, chunks, storage, attributes, dimension_names)
    store = ts.open(spec, context=context).result()
    if storage.zarr_format == 2:
        write_zattrs(path, attributes)
    return store


def write_zattrs(path: Path, attributes: dict) -> None:
    with open(path / ".zattrs", "w") as f:
        json.dump(attributes, f, indent=2)


ZARR_DRIVERS = {2: "zarr", 3: "zarr3"}  # TensorStore driver per zarr format
METADATA_FILES = {2: ".zarray", 3: "zarr.json"}  # an array's metadata document per format
ATTRIBUTE_FILES = {2: ".zattrs", 3: "zarr.json"}  # a node's (array or group) user attributes per format


def zarr_format_of(path: Path) -> int:
    for zarr_format in (3, 2):
        if (path / METADATA_FILES[zarr_format]).is_file():
            return zarr_format
    raise FileNotFoundError(f"{path} is not a zarr array (no .zarray or zarr.json)")


def attributes_in(zarr_format: int, document: dict) -> dict:
    """The user attributes in a node's attribute document: all of .zattrs (v2), the
    'attributes' member of zarr.json (v3)."""
    return document.get("attributes", {}) if zarr_format == 3 else document


@dataclass(frozen=True)
class ArrayMetadata:
    """What an array's .zarray / zarr.json says, for v2 and v3 alike."""

    zarr_format: int
    shape: tuple[int, ...]
    dtype: str  # v2: numpy-style string ('<f2', 'bfloat16'); v3: data_type ('float16')
    chunks: tuple[int, ...]  # the read/write chunk (a v3 shard's inner chunk)
    document: dict  # the parsed metadata document, for format-specific keys

    @property
    def itemsize(self) -> int:
        return dtype_itemsize(self.dtype)


def read_array_metadata(path: Path) -> ArrayMetadata:
    """Parse the metadata document of the local array at path (the one parser of it)."""
    zarr_format = zarr_format_of(path)
    document = json.loads((path / METADATA_FILES[zarr_format]).read_text())
    if zarr_format == 2:
        return ArrayMetadata(2, tuple(document["shape"]), document["dtype"], tuple(document["chunks"]), document)
    chunks = document["chunk_grid"]["configuration"]["chunk_shape"]
    for codec in document.get("codecs", []):
        if codec["name"] == "sharding_indexed":
            chunks = codec["configuration"]["chunk_shape"]
    return ArrayMetadata(3, tuple(document["shape"]), document["data_type"], tuple(chunks), document)


def open_array(path: Path, context: ts.Context | None = None, zarr_format: int | None = None) -> ts.TensorStore:
    """Open an existing array read-only, v2 or v3, with caching off (reads go to the files)."""
    driver = ZARR_DRIVERS[zarr_format or zarr_format_of(path)]
    spec = {"driver": driver, "kvstore": {"driver": "file", "path": str(path)}, "open": True}
    return ts.open(spec, context=context or ts.Context(), read=True, write=False).result()


def read_attributes(path: Path, array: ArrayMetadata | None = None) -> dict:
    """An array's user attributes; given its parsed metadata, zarr v3's are taken from that
    document rather than parsed again (v2 keeps them in their own file, .zattrs)."""
    zarr_format = array.zarr_format if array is not None else zarr_format_of(path)
    if array is not None and ATTRIBUTE_FILES[zarr_format] == METADATA_FILES[zarr_format]:
        return attributes_in(zarr_format, array.document)
    document = path / ATTRIBUTE_FILES[zarr_format]
    return attributes_in(zarr_format, json.loads(document.read_text())) if document.is_file() else {}


def storage_chunks(path: Path) -> tuple[int, ...]:
    """The read/write chunk shape of an array (the inner chunk of a v3 shard)."""
    return read_array_metadata(path).chunks


# ----------------------------------------------------------------------------- checksums


def chunk_slices(
    shape: Sequence[int], chunks: Sequence[int]
) -> Iterator[tuple[tuple[int, ...], tuple[slice, ...]]]:
    """(chunk grid index, slices) for every chunk of an array, in C order."""
    grid = [range((s + c - 1) // c) for s, c in zip(shape, chunks)]
    for index in itertools.product(*grid):
        yield index, tuple(slice(i * c, min(s, (i + 1) * c)) for i, c, s in zip(index, chunks, shape))


def chunk_key(index: Sequence[int]) -> str:
    return ".".join(str(i) for i in index)


def crc32_of(block: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(block).view(np.uint8))


def block_checksums(block: np.ndarray, block_origin: Sequence[int], chunks: Sequence[int]) -> dict[str, int]:
    """crc32 of every chunk inside a chunk-aligned block, keyed by the chunk's grid index."""
    sums = {}
    for local_index, slices in chunk_slices(block.shape, chunks):
        grid_index = tuple(o // c + i for o, c, i in zip(block_origin, chunks, local_index))
        sums[chunk_key(grid_index)] = crc32_of(block[slices])
    return sums
