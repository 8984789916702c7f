"""A storage form: how a volume's features are kept on disk, and everything that follows from
it. `FeatureStorage` is the interface; dense.py and tokens.py are its two forms. The form of a
run is chosen once, from the settings (`--layout`), and the form of a volume once, from its
metadata (`configuration.layout`), with `storage_for`; nothing outside this package compares
form names.

A form owns: its array's name, shape, chunks, dimension names and attributes; the bytes it
needs; how the writer's token grids become blocks of that array; how a region is read back as
float32 features (directly, or built from what is stored); what verification checks beyond
what every array gets; and the name the audit groups its volumes by.

This module and the forms import no torch at import time: the settings (on login nodes, where
torch is not imported) ask the registry for the forms' names and default chunks.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from dinov3_cache.zarr_arrays import StorageError, StorageOptions, feature_chunks

if TYPE_CHECKING:
    import numpy as np
    import torch

    from dinov3_cache.geometry import VoxelGrid
    from dinov3_cache.schema import VolumeMetadata


DEFAULT_STORAGE_FORM = "dense"  # the default of --layout, and the form of volumes whose metadata names none


class UnknownStorageForm(StorageError):
    """A storage form name no registered form has."""


class CropTokens(Protocol):
    """The token grids of the crop being extracted, as a form asks for them (the writer's
    side, extraction/writer.py). Grids are (C, n, g, g) in a plane's stored order."""

    out_dim: int  # D, the features' edge length
    streaming_axis: int  # the axis (z=0, y=1, x=2) the streaming plane's slabs run along

    def streamed_slabs(self, slab: int) -> Iterator[tuple[dict[str, Any], int, int]]:
        """(grids by plane, start, stop) per slab of `slab` slices along streaming_axis: the
        other planes whole, the streaming plane's slices start:stop."""

    def plane_slabs(self, slab: int) -> Iterator[tuple[int, int, Any]]:
        """(plane position, first slice, grids) per slab of `slab` slices of every plane in turn."""


class BlockOutput(Protocol):
    """Where a form's blocks go (the writer's FeatureOutput): the staged array, buffers, checksums."""

    dtype: str  # the stored dtype
    unit: tuple[int, ...]  # the block a write must fill whole (a chunk, or a zarr v3 shard)
    block_bytes: int  # about how large a block to hand over (a few are in flight at once)

    def put(self, origin: tuple[int, ...], shape: tuple[int, ...], compute_channels) -> None:
        """Write the block at origin; compute_channels(lo, hi) gives its channels lo:hi."""


class BuiltCrop(Protocol):
    """A crop whose features are built after the read (token volumes): the loader builds them
    where the batch goes (loader/tokens.py)."""

    shape: tuple[int, ...]  # (C, dz, dy, dx)
    stored_dtype: torch.dtype

    def features(self, device: torch.device | None = None, out: torch.Tensor | None = None) -> torch.Tensor: ...


class FeatureStorage(ABC):
    """One storage form. Subclasses set the class attributes and implement the abstract methods;
    `register_storage(Form())` makes it a choice of --layout and readable from metadata."""

    name: str  # the --layout value, recorded as configuration.layout
    description: str  # for --help
    array_name: str  # the array holding the features: volume_XXXXXX_<array_name>.zarr
    default_chunks: tuple[int, ...]  # --chunks auto
    chunk_axes: str  # what --chunks' four numbers mean in this form, e.g. 'C,Z,Y,X'
    dimension_names: tuple[str, ...]  # the array's axes (zarr v3 dimension_names)
    builds_features: bool = False  # True: reads return a BuiltCrop, whose features the loader builds

    # ------------------------------------------------------------------ the array

    def requested_chunks(self, storage: StorageOptions) -> tuple[int, ...]:
        """The chunks --chunks asks for (four numbers, `chunk_axes`), or this form's default."""
        return storage.feature_chunks if storage.feature_chunks is not None else self.default_chunks

    @abstractmethod
    def array_shape(self, channels: int, out_dim: int, planes: Sequence[str], grid_size: int) -> tuple[int, ...]:
        """The stored array's shape for C channels, D^3 features, these planes and g tokens per image axis."""

    def array_chunks(self, shape: Sequence[int], requested: Sequence[int]) -> tuple[int, ...]:
        """The chunks written for `requested` (a channel chunk that divides C, sizes clamped)."""
        return feature_chunks(shape, requested)

    def array_attributes(self, grid: VoxelGrid, planes: Sequence[str]) -> dict:
        """The array's user attributes; a 'dinov3_cache' member is merged with the run's (commit id...)."""
        return grid.array_attributes(channel_axis=True)

    def bytes_needed(self, channels: int, out_dim: int, planes: Sequence[str], grid_size: int, itemsize: int) -> int:
        """Uncompressed bytes of the array (the free-space check adds labels and a margin)."""
        return math.prod(self.array_shape(channels, out_dim, planes, grid_size)) * itemsize

    # ------------------------------------------------------------------ writing and reading

    @abstractmethod
    def write_features(self, tokens: CropTokens, output: BlockOutput) -> None:
        """Write the whole array: every block of the crop's features in this form."""

    @abstractmethod
    def read_region(self, store, planes: Sequence[str], region: Sequence[tuple[int, int]]) -> np.ndarray:
        """The features (C, dz, dy, dx) of region ((start, stop) along z, y, x) as float32, from
        the opened TensorStore array (the audit's previews; the loader uses start_read)."""

    @abstractmethod
    def start_read(
        self, reader, spatial: Sequence[slice], out: torch.Tensor | None, allocate=None
    ) -> tuple[BuiltCrop | None, list]:
        """Start the loader's reads of the features of `spatial` through `reader` (a
        loader.reader.VolumeReader); finish with reader.finish(pending). Returns (None, pending)
        when the stored values land in `out` (C, dz, dy, dx) as they are, or (crop, pending)
        when `builds_features`: the crop builds them once the reads are done (`out` unused).
        allocate(shape, dtype), when given, provides the memory the form reads into besides
        `out` (the loader's reused batch buffers)."""

    # ------------------------------------------------------------------ verification

    def volume_problems(self, metadata: VolumeMetadata) -> list[str]:
        """What the metadata must say about this form's array (verification adds it to the
        checks every array gets: existence, shape, dtype, chunks, checksums)."""
        if self.array_name not in (metadata.dtypes or {}) or self.array_name not in metadata.shapes:
            return [f"stored as '{self.name}' but the metadata lists no '{self.array_name}' array"]
        return []

    def attribute_problems(self, attributes: dict, metadata: VolumeMetadata) -> list[str]:
        """What this form's array attributes must agree on with the metadata (beyond the commit id)."""
        return []


# ----------------------------------------------------------------------------- registry

_FORMS: dict[str, FeatureStorage] = {}


def register_storage(form: FeatureStorage) -> FeatureStorage:
    """Make `form` a storage form (a --layout choice, readable from metadata); returns it."""
    if form.name in _FORMS and _FORMS[form.name] is not form:
        raise ValueError(f"a storage form named {form.name!r} is registered already")
    _FORMS[form.name] = form
    return form


def unregister_storage(name: str) -> None:
    """Forget a form (a test's own form, when the test is done)."""
    _FORMS.pop(name, None)


def storage_form_names() -> tuple[str, ...]:
    return tuple(_FORMS)


class RegisteredNames(Sequence):
    """The registered form names, read at each use: as the choices of --layout (and of a
    settings file's 'layout') they include a form registered after the settings were declared."""

    def __getitem__(self, index):
        return storage_form_names()[index]

    def __len__(self) -> int:
        return len(_FORMS)

    def __repr__(self) -> str:
        return repr(storage_form_names())


def storage_for(name: str | None) -> FeatureStorage:
    """The form called `name`; None (metadata written before forms were recorded) is the default."""
    try:
        return _FORMS[name or DEFAULT_STORAGE_FORM]
    except KeyError:
        raise UnknownStorageForm(f"--layout must be one of {', '.join(_FORMS)}, got {name!r}") from None


def feature_array_names() -> tuple[str, ...]:
    """The array names of every form (each volume has one of them)."""
    return tuple(dict.fromkeys(form.array_name for form in _FORMS.values()))
