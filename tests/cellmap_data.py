"""Small CellMap-layout datasets laid out like the published buckets: zarr v2 hierarchies
(``.zgroup`` at every level) with OME-NGFF 0.4 multiscales and blosc-zstd chunks under ``/``
separators, or N5 containers with COSEM attributes; crop and class groups and every label
array carry ``cellmap`` annotation attributes (cellmap-schemas) with encodings and
complement counts. alpha's crop2 mito holds an 'unknown' region (UNKNOWN below UNKNOWN_Z_NM).

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
UNKNOWN = 255  # the stored value of 'unknown' voxels in every label array
INSTANCE_ENCODING = {"absent": 0, "unknown": UNKNOWN}
SEMANTIC_ENCODING = {"absent": 0, "present": 1, "unknown": UNKNOWN}
BLOSC_ZSTD = {"id": "blosc", "cname": "zstd", "clevel": 5, "shuffle": 1, "blocksize": 0}


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


def write_array(path: Path, data: np.ndarray, fmt: str, chunks: Sequence[int], compression: str | None = "default") -> None:
    """compression None: raw chunks; 'default': blosc-zstd (zarr) or gzip (N5), as published."""
    if fmt == "n5":
        # N5 lists dimensions fastest-first, as the Java N5 writers do: (x, y, z)
        compressor = {"type": "raw"} if compression is None else {"type": "gzip", "level": -1}
        spec = {
            "driver": "n5", "kvstore": {"driver": "file", "path": str(path)},
            "metadata": {"dimensions": list(data.shape[::-1]), "blockSize": list(chunks[::-1]), "dataType": data.dtype.name, "compression": compressor},
            "create": True, "delete_existing": True,
        }
        ts.open(spec).result()[...] = data.T
        return
    compressor = None if compression is None else BLOSC_ZSTD
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


def update_attributes(path: Path, fmt: str, attributes: dict) -> None:
    """Merge attributes into an existing group's or array's attribute document."""
    document = path / ("attributes.json" if fmt == "n5" else ".zattrs")
    current = json.loads(document.read_text()) if document.is_file() else {}
    document.write_text(json.dumps({**current, **attributes}))


def write_parent_groups(group: Path, fmt: str) -> None:
    """Every directory from the container down to group is a group (as in the published data)."""
    path = group
    while path.parent != path and not path.name.endswith((".zarr", ".n5")):
        path = path.parent
    write_group_attributes(path, fmt, {})
    for parent in group.relative_to(path).parents:
        node = path / parent
        if node != path and not ((node / ".zgroup").is_file() or (node / "attributes.json").is_file()):
            write_group_attributes(node, fmt, {})


def ome_multiscales(levels: Sequence[tuple[str, Sequence[float], Sequence[float]]]) -> dict:
    return {"multiscales": [{
        "version": "0.4", "name": "",
        "axes": [{"name": a, "type": "space", "unit": "nanometer"} for a in "zyx"],
        "datasets": [
            {"path": p, "coordinateTransformations": [{"type": "scale", "scale": list(map(float, s))}, {"type": "translation", "translation": list(map(float, t))}]}
            for p, s, t in levels
        ],
    }]}


def cosem_transform(scale: Sequence[float], translation: Sequence[float]) -> dict:
    return {"order": "C", "axes": ["z", "y", "x"], "scale": list(map(float, scale)), "translate": list(map(float, translation)), "units": ["nm"] * 3}


def pixel_resolution(scale: Sequence[float]) -> dict:
    """neuroglancer's N5 attribute: voxel size listed x, y, z."""
    return {"dimensions": list(map(float, scale[::-1])), "unit": "nm"}


def cellmap_n5_multiscales(levels: Sequence[tuple[str, Sequence[float], Sequence[float]]]) -> dict:
    """COSEM group attributes: a 'transform' per level plus neuroglancer's N5 keys."""
    s0 = levels[0][1]
    return {
        "axes": ["x", "y", "z"], "units": ["nm"] * 3, "pixelResolution": pixel_resolution(s0),
        "scales": [[round(a / b) for a, b in zip(s[::-1], s0[::-1])] for _, s, _ in levels],
        "multiscales": [{"name": None, "datasets": [{"path": p, "transform": cosem_transform(s, t)} for p, s, t in levels]}],
    }


def annotation_type(kind: str) -> dict:
    encoding = SEMANTIC_ENCODING if kind == "semantic" else INSTANCE_ENCODING
    return {"type": f"{kind}_segmentation", "encoding": dict(encoding)}


def complement_counts(data: np.ndarray, kind: str) -> dict:
    encoding = SEMANTIC_ENCODING if kind == "semantic" else INSTANCE_ENCODING
    return {p: int((data == encoding[p]).sum()) for p in ("absent", "unknown")}


def annotate(group: Path, fmt: str, class_name: str, kind: str, arrays: dict[str, np.ndarray]) -> None:
    """cellmap-schemas annotation attributes on a class group and each of its level arrays."""
    update_attributes(group, fmt, {"cellmap": {"annotation": {"class_name": class_name, "annotation_type": annotation_type(kind)}}})
    for name, data in arrays.items():
        update_attributes(group / name, fmt, {"cellmap": {"annotation": {
            "class_name": class_name, "annotation_type": annotation_type(kind), "complement_counts": complement_counts(data, kind),
        }}})


def annotate_crop(crop: Path, fmt: str, class_names: Sequence[str]) -> None:
    update_attributes(crop, fmt, {"cellmap": {"annotation": {
        "version": "0.1.1", "name": crop.name, "description": "test crop", "created_by": ["tests"], "created_with": ["numpy"],
        "start_date": None, "end_date": None, "duration_days": None, "protocol_uri": None, "class_names": list(class_names),
    }}})


def write_multiscale(
    group: Path, fmt: str, corner: Sequence[float], extent: Sequence[float], scales: Sequence[Sequence[float]],
    content, dtype, chunks: Sequence[int] = (32, 32, 32), names: Sequence[str] | None = None, compression: str | None = "default",
) -> dict[str, np.ndarray]:
    """One multiscale group: level k at scales[k] covering extent nm from corner; content(corner, scale, shape, dtype)."""
    levels, arrays = [], {}
    write_parent_groups(group, fmt)
    for k, scale in enumerate(scales):
        name = names[k] if names else f"s{k}"
        shape = [int(round(e / s)) for e, s in zip(extent, scale)]
        data = content(corner, scale, shape, dtype)
        write_array(group / name, data, fmt, chunks, compression)
        levels.append((name, scale, level_translation(corner, scale)))
        if fmt == "n5":
            update_attributes(group / name, fmt, {
                "transform": cosem_transform(scale, levels[-1][2]), "pixelResolution": pixel_resolution(scale),
                "downsamplingFactors": [round(a / b) for a, b in zip(scale[::-1], scales[0][::-1])],
            })
        arrays[name] = data
    write_group_attributes(group, fmt, cellmap_n5_multiscales(levels) if fmt == "n5" else ome_multiscales(levels))
    return arrays


def raw_content(mito: Sequence[Sphere]):
    def content(corner, scale, shape, dtype):
        inside = sample_spheres(mito, corner, scale, shape, np.uint64) > 0
        return np.where(inside, RAW_INSIDE, RAW_OUTSIDE).astype(dtype)
    return content


def label_content(spheres: Sequence[Sphere], unknown_below_z: float | None = None):
    """Sphere labels; voxels whose centre lies below z = unknown_below_z nm are UNKNOWN."""
    def content(corner, scale, shape, dtype):
        labels = sample_spheres(spheres, corner, scale, shape, dtype)
        if unknown_below_z is not None:
            z = corner[0] + (np.arange(shape[0]) + 0.5) * scale[0]
            labels[z < unknown_below_z] = UNKNOWN
        return labels
    return content


def write_labels(
    root: Path, dataset: str, crop: str, organelle: str, kind: str, corner, extent, scales, content, dtype, chunks, fmt: str = "zarr",
) -> dict[str, np.ndarray]:
    group = crop_group(root, dataset, crop, organelle, fmt)
    arrays = write_multiscale(group, fmt, corner, extent, scales, content, dtype, chunks=chunks)
    annotate(group, fmt, organelle, kind, arrays)
    return arrays


def decoded(stored: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(labels, known) of a stored label array: UNKNOWN voxels are label 0 and not known."""
    known = stored != UNKNOWN
    return np.where(known, stored, 0).astype(stored.dtype), known


def container(root: Path, dataset: str, fmt: str = "zarr") -> Path:
    return root / dataset / f"{dataset}.{'n5' if fmt == 'n5' else 'zarr'}"


def raw_group(root: Path, dataset: str, fmt: str = "zarr") -> Path:
    return container(root, dataset, fmt) / "recon-1" / "em" / "fibsem-uint8"


def crop_root(root: Path, dataset: str, crop: str, fmt: str = "zarr") -> Path:
    return container(root, dataset, fmt) / "recon-1" / "labels" / "groundtruth" / crop


def crop_group(root: Path, dataset: str, crop: str, organelle: str, fmt: str = "zarr") -> Path:
    return crop_root(root, dataset, crop, fmt) / organelle


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
UNKNOWN_Z_NM = ALPHA_CORNER[0] + 256 + 512  # crop2 mito: 'unknown' below this z (its first 512 nm)


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
    for organelle, spheres, dtype, kind in (("mito", mito, np.uint64, "instance"), ("nuc", nuc, np.uint8, "semantic")):
        info["crop1"][organelle] = write_labels(
            root, "jrc_alpha", "crop1", organelle, kind, crop1_corner, crop1_extent, [[64] * 3, [128] * 3], label_content(spheres), dtype, (8, 8, 8)
        )
    annotate_crop(crop_root(root, "jrc_alpha", "crop1"), "zarr", ["mito", "nuc"])
    crop2_corner, crop2_extent = corner + 256, np.array([2560.0] * 3)
    info["crop2"] = {"corner": crop2_corner, "extent": crop2_extent, "unknown_below_z": UNKNOWN_Z_NM}
    for organelle, content, dtype in (("mito", label_content(mito, UNKNOWN_Z_NM), np.uint64), ("cell", label_content(cells), np.uint32)):
        info["crop2"][organelle] = write_labels(
            root, "jrc_alpha", "crop2", organelle, "instance", crop2_corner, crop2_extent, [[32] * 3, [64] * 3], content, dtype, (16, 16, 16)
        )
    annotate_crop(crop_root(root, "jrc_alpha", "crop2"), "zarr", ["mito", "cell"])
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
    info["crop3"]["mito"] = write_labels(
        root, "jrc_beta", "crop3", "mito", "instance", corner, info["crop3"]["extent"], [[40, 32, 32], [80, 64, 64]], label_content(mito), np.uint32, (16, 16, 16)
    )
    annotate_crop(crop_root(root, "jrc_beta", "crop3"), "zarr", ["mito"])
    return info


def build_gamma(root: Path, corner: Sequence[float] = (0.0, 0.0, 0.0)) -> dict:
    """N5 container (CellMap N5 metadata): raw 32/64 nm, crop4 cell at 128 nm, all from corner nm."""
    rng = np.random.default_rng(3)
    corner = np.asarray(corner, float)
    extent = np.array([2560.0] * 3)
    mito = random_spheres(rng, corner, corner + extent, 20, (150, 300), 1)
    cells = random_spheres(rng, corner, corner + extent, 10, (500, 900), 1)
    info = {"mito": mito, "cell": cells}
    info["raw"] = write_multiscale(raw_group(root, "jrc_gamma", "n5"), "n5", corner, extent, [[32] * 3, [64] * 3], raw_content(mito), np.uint8)
    info["crop4"] = {"corner": corner, "extent": extent}
    info["crop4"]["cell"] = write_labels(
        root, "jrc_gamma", "crop4", "cell", "instance", corner, extent, [[128] * 3], label_content(cells), np.uint64, (8, 8, 8), "n5"
    )
    annotate_crop(crop_root(root, "jrc_gamma", "crop4", "n5"), "n5", ["cell"])
    return info
