"""Small CellMap-layout datasets with real OME-NGFF (or CellMap N5) multiscale metadata.

A dataset is a world of spheres in nm. Each level of each array samples the world at its
voxel centres, so every level and every array agrees about where things are, and raw is
bright (200) inside a mitochondrion, dark (60) elsewhere: alignment of raw and labels can
be checked on any crop without trusting the code under test.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorstore as ts

RAW_INSIDE, RAW_OUTSIDE = 200, 60


@dataclass(frozen=True)
class Sphere:
    centre: tuple[float, float, float]
    radius: float
    label: int


def sample_spheres(spheres: Sequence[Sphere], corner: Sequence[float], scale: Sequence[float], shape: Sequence[int], dtype) -> np.ndarray:
    """Label of the sphere holding each voxel centre (later spheres win), 0 elsewhere."""
    axes = [corner[a] + (np.arange(shape[a]) + 0.5) * scale[a] for a in range(3)]
    z, y, x = axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :]
    out = np.zeros(tuple(shape), dtype)
    for s in spheres:
        inside = (z - s.centre[0]) ** 2 + (y - s.centre[1]) ** 2 + (x - s.centre[2]) ** 2 < s.radius ** 2
        out[inside] = s.label
    return out


def level_translation(corner: Sequence[float], scale: Sequence[float]) -> list[float]:
    """OME-NGFF translation = centre of voxel 0 (CellMap's convention)."""
    return [float(c + s / 2) for c, s in zip(corner, scale)]


def write_array(path: Path, data: np.ndarray, fmt: str, chunks: Sequence[int], compression: str | None = None) -> None:
    if fmt == "n5":
        # N5 lists dimensions fastest-first, as the Java N5 writers do: (x, y, z)
        compressor = {"type": "raw"} if compression is None else {"type": "zstd", "level": 3}
        spec = {
            "driver": "n5", "kvstore": {"driver": "file", "path": str(path)},
            "metadata": {"dimensions": list(data.shape[::-1]), "blockSize": list(chunks[::-1]), "dataType": data.dtype.name, "compression": compressor},
            "create": True, "delete_existing": True,
        }
        ts.open(spec).result()[...] = data.T
        return
    compressor = None if compression is None else {"id": "zstd", "level": 3}
    spec = {
        "driver": "zarr", "kvstore": {"driver": "file", "path": str(path)},
        "metadata": {"shape": list(data.shape), "chunks": [min(c, s) for c, s in zip(chunks, data.shape)], "dtype": data.dtype.newbyteorder("<").str if data.dtype.itemsize > 1 else data.dtype.str, "compressor": compressor, "fill_value": 0, "order": "C", "dimension_separator": "/"},
        "create": True, "delete_existing": True,
    }
    ts.open(spec).result()[...] = data


def write_group_attributes(path: Path, fmt: str, attributes: dict) -> None:
    path.mkdir(parents=True, exist_ok=True)
    if fmt == "n5":
        (path / "attributes.json").write_text(json.dumps({"n5": "2.0.0", **attributes}))
    else:
        (path / ".zgroup").write_text(json.dumps({"zarr_format": 2}))
        (path / ".zattrs").write_text(json.dumps(attributes))


def ome_multiscales(levels: Sequence[tuple[str, Sequence[float], Sequence[float]]]) -> dict:
    return {"multiscales": [{
        "version": "0.4", "name": "",
        "axes": [{"name": a, "type": "space", "unit": "nanometer"} for a in "zyx"],
        "datasets": [
            {"path": p, "coordinateTransformations": [{"type": "scale", "scale": list(map(float, s))}, {"type": "translation", "translation": list(map(float, t))}]}
            for p, s, t in levels
        ],
    }]}


def cellmap_n5_multiscales(levels: Sequence[tuple[str, Sequence[float], Sequence[float]]]) -> dict:
    """CellMap's N5 flavour: a 'transform' per level."""
    return {"multiscales": [{"datasets": [
        {"path": p, "transform": {"axes": ["z", "y", "x"], "scale": list(map(float, s)), "translate": list(map(float, t)), "units": ["nm"] * 3}}
        for p, s, t in levels
    ]}]}


def write_multiscale(
    group: Path, fmt: str, corner: Sequence[float], extent: Sequence[float], scales: Sequence[Sequence[float]],
    content, dtype, chunks: Sequence[int] = (32, 32, 32), names: Sequence[str] | None = None, compression: str | None = None,
) -> dict[str, np.ndarray]:
    """One multiscale group: level k at scales[k] covering extent nm from corner; content(corner, scale, shape, dtype)."""
    levels, arrays = [], {}
    for k, scale in enumerate(scales):
        name = names[k] if names else f"s{k}"
        shape = [int(round(e / s)) for e, s in zip(extent, scale)]
        data = content(corner, scale, shape, dtype)
        write_array(group / name, data, fmt, chunks, compression)
        levels.append((name, scale, level_translation(corner, scale)))
        arrays[name] = data
    write_group_attributes(group, fmt, cellmap_n5_multiscales(levels) if fmt == "n5" else ome_multiscales(levels))
    return arrays


def raw_content(mito: Sequence[Sphere]):
    def content(corner, scale, shape, dtype):
        inside = sample_spheres(mito, corner, scale, shape, np.uint64) > 0
        return np.where(inside, RAW_INSIDE, RAW_OUTSIDE).astype(dtype)
    return content


def label_content(spheres: Sequence[Sphere]):
    def content(corner, scale, shape, dtype):
        return sample_spheres(spheres, corner, scale, shape, dtype)
    return content


def container(root: Path, dataset: str, fmt: str = "zarr") -> Path:
    return root / dataset / f"{dataset}.{'n5' if fmt == 'n5' else 'zarr'}"


def raw_group(root: Path, dataset: str, fmt: str = "zarr") -> Path:
    return container(root, dataset, fmt) / "recon-1" / "em" / "fibsem-uint8"


def crop_group(root: Path, dataset: str, crop: str, organelle: str, fmt: str = "zarr") -> Path:
    return container(root, dataset, fmt) / "recon-1" / "labels" / "groundtruth" / crop / organelle


def inference_group(root: Path, dataset: str, organelle: str, fmt: str = "zarr") -> Path:
    return container(root, dataset, fmt) / "recon-1" / "labels" / "inference" / "segmentations" / organelle


def random_spheres(rng: np.random.Generator, lo, hi, n: int, radius: tuple[float, float], first_label: int) -> list[Sphere]:
    return [
        Sphere(tuple(float(v) for v in rng.uniform(lo, hi)), float(rng.uniform(*radius)), first_label + i)
        for i in range(n)
    ]


# ----------------------------------------------------------------------------- the test datasets

ALPHA_CORNER = (100.0, 40.0, 0.0)  # world corner of every alpha raw level
BIG_ID = 2**40  # mito instance ids in alpha exceed 32 bits


def build_alpha(root: Path) -> dict:
    """Isotropic zarr: raw 16/32/64 nm; crop1 (mito uint64 + nuc uint8 at 64/128 nm, a
    1024 nm box), crop2 (mito + cell at 32/64 nm, no 128 nm level, a 2560 nm box),
    inference mito at 128 nm over the whole raw."""
    rng = np.random.default_rng(1)
    corner = np.asarray(ALPHA_CORNER)
    extent = np.array([3072.0] * 3)
    mito = random_spheres(rng, corner, corner + extent, 40, (120, 300), BIG_ID + 1)
    nuc = [Sphere(tuple(corner + 1200), 500.0, 1)]
    cells = random_spheres(rng, corner, corner + extent, 12, (500, 900), 1)
    info = {"mito": mito, "nuc": nuc, "cell": cells}
    info["raw"] = write_multiscale(raw_group(root, "jrc_alpha"), "zarr", corner, extent, [[16] * 3, [32] * 3, [64] * 3], raw_content(mito), np.uint8)
    crop1_corner, crop1_extent = corner + np.array([512, 640, 768]), np.array([1024.0] * 3)
    info["crop1"] = {"corner": crop1_corner, "extent": crop1_extent}
    for organelle, spheres, dtype in (("mito", mito, np.uint64), ("nuc", nuc, np.uint8)):
        info["crop1"][organelle] = write_multiscale(
            crop_group(root, "jrc_alpha", "crop1", organelle), "zarr", crop1_corner, crop1_extent, [[64] * 3, [128] * 3], label_content(spheres), dtype, chunks=(8, 8, 8)
        )
    crop2_corner, crop2_extent = corner + 256, np.array([2560.0] * 3)
    info["crop2"] = {"corner": crop2_corner, "extent": crop2_extent}
    for organelle, spheres, dtype in (("mito", mito, np.uint64), ("cell", cells, np.uint32)):
        info["crop2"][organelle] = write_multiscale(
            crop_group(root, "jrc_alpha", "crop2", organelle), "zarr", crop2_corner, crop2_extent, [[32] * 3, [64] * 3], label_content(spheres), dtype, chunks=(16, 16, 16)
        )
    info["inference"] = {"corner": corner, "extent": extent}
    info["inference"]["mito"] = write_multiscale(
        inference_group(root, "jrc_alpha", "mito"), "zarr", corner, extent, [[128] * 3], label_content(mito), np.uint64, chunks=(8, 8, 8)
    )
    return info


BETA_CORNER = (0.0, 0.0, 0.0)
BETA_RAW_SCALES = [[20, 16, 16], [40, 32, 32]]  # no level is 32 nm on every axis: s0 is resampled


def build_beta(root: Path) -> dict:
    """Anisotropic zarr with missing levels: raw (20,16,16)/(40,32,32) nm, crop3 mito at
    (40,32,32)/(80,64,64) nm (no 128 nm level), box = the whole raw."""
    rng = np.random.default_rng(2)
    corner = np.asarray(BETA_CORNER)
    extent = np.array([2600.0, 2560.0, 2560.0])
    mito = random_spheres(rng, corner, corner + extent, 30, (150, 350), 1)
    info = {"mito": mito}
    info["raw"] = write_multiscale(raw_group(root, "jrc_beta"), "zarr", corner, extent, BETA_RAW_SCALES, raw_content(mito), np.uint8)
    info["crop3"] = {"corner": corner, "extent": np.array([2560.0, 2560.0, 2560.0])}
    info["crop3"]["mito"] = write_multiscale(
        crop_group(root, "jrc_beta", "crop3", "mito"), "zarr", corner, info["crop3"]["extent"], [[40, 32, 32], [80, 64, 64]], label_content(mito), np.uint32, chunks=(16, 16, 16)
    )
    return info


def build_gamma(root: Path) -> dict:
    """N5 container (CellMap N5 metadata): raw 32 nm, crop4 cell at 128 nm."""
    rng = np.random.default_rng(3)
    corner = np.array([0.0, 0.0, 0.0])
    extent = np.array([2560.0] * 3)
    mito = random_spheres(rng, corner, corner + extent, 20, (150, 300), 1)
    cells = random_spheres(rng, corner, corner + extent, 10, (500, 900), 1)
    info = {"mito": mito, "cell": cells}
    info["raw"] = write_multiscale(raw_group(root, "jrc_gamma", "n5"), "n5", corner, extent, [[32] * 3, [64] * 3], raw_content(mito), np.uint8)
    info["crop4"] = {"corner": corner, "extent": extent}
    info["crop4"]["cell"] = write_multiscale(
        crop_group(root, "jrc_gamma", "crop4", "cell", "n5"), "n5", corner, extent, [[128] * 3], label_content(cells), np.uint64, chunks=(8, 8, 8)
    )
    return info
