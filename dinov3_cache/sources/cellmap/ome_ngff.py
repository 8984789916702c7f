"""OME-NGFF 0.4 multiscales (and CellMap's N5/COSEM attributes): the levels of a group in
world units, the level to read for a target voxel size, and that level opened z, y, x.

OME-NGFF ``translation`` is the centre of voxel 0 (how CellMap pyramids are written: level
k's translation is level 0's plus (scale_k - scale_0) / 2), so voxel i of a level covers
[translation - scale/2 + i*scale, ... + scale).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import tensorstore as ts

from dinov3_cache.sources.base import SourceError
from dinov3_cache.sources.cellmap.store import Storage, join_url, kvstore_spec, storage_error
from dinov3_cache.zarr_arrays import ATTRIBUTE_FILES, ZARR_DRIVERS, attributes_in

TOLERANCE = 1e-6
UNIT_TO_NM = {"nanometer": 1.0, "nm": 1.0, "micrometer": 1000.0, "um": 1000.0, "angstrom": 0.1}
AXES = ("z", "y", "x")
N5_ATTRIBUTES = "attributes.json"


@dataclass(frozen=True)
class Level:
    """One level of a multiscale group, in z, y, x order and nm."""

    path: str
    scale: tuple[float, float, float]
    translation: tuple[float, float, float]

    @property
    def corner(self) -> np.ndarray:
        """World position of voxel 0's first corner (translation is its centre)."""
        return np.asarray(self.translation) - np.asarray(self.scale) / 2


@dataclass(frozen=True)
class Multiscale:
    url: str
    driver: str  # zarr | zarr3 | n5
    levels: tuple[Level, ...]
    axis_order: tuple[int, ...]  # stored axis positions of z, y, x


def read_multiscale(url: str, storage: Storage) -> Multiscale:
    """The levels of the multiscale group at url, from its OME-NGFF (or CellMap N5) metadata."""
    for zarr_format in (2, 3):
        document = storage.read_json(join_url(url, ATTRIBUTE_FILES[zarr_format]))
        if document is not None:
            return parse_multiscale(url, ZARR_DRIVERS[zarr_format], attributes_in(zarr_format, document))
    document = storage.read_json(join_url(url, N5_ATTRIBUTES))
    if document is not None:
        return parse_multiscale(url, "n5", document)
    raise SourceError(f"no multiscale group at {url} (no .zattrs, zarr.json or attributes.json); check the path")


def parse_multiscale(url: str, driver: str, attributes: dict) -> Multiscale:
    def corrupt(why: str) -> SourceError:
        return SourceError(f"corrupt multiscale metadata at {url}: {why}; fix its OME-NGFF 'multiscales' attribute")

    multiscales = attributes.get("multiscales") or attributes.get("ome", {}).get("multiscales")
    if not isinstance(multiscales, list) or not multiscales or not isinstance(multiscales[0], dict):
        raise corrupt("no 'multiscales' list")
    meta = multiscales[0]
    names, factors = axis_names_and_units(meta.get("axes"), corrupt)
    datasets = meta.get("datasets")
    if not isinstance(datasets, list) or not datasets:
        raise corrupt("no 'datasets' levels")
    global_scale, global_translation = transforms_of(meta.get("coordinateTransformations") or [], len(names), corrupt)
    levels = []
    for entry in datasets:
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            raise corrupt("a level without 'path'")
        if "transform" in entry:  # CellMap's N5 convention
            transform = entry["transform"] if isinstance(entry["transform"], dict) else {}
            listed = {k: transform.get(k) for k in ("axes", "units", "scale", "translate")}
            if transform.get("ordering") == "F":  # listed fastest-first: back to C order
                listed = {k: v[::-1] if isinstance(v, list) else v for k, v in listed.items()}
            names, factors = axis_names_and_units(listed["axes"], corrupt, listed["units"])
            scale, translation = transforms_of(
                [{"type": "scale", "scale": listed["scale"]}, {"type": "translation", "translation": listed["translate"] or [0] * 3}],
                len(names), corrupt,
            )
        else:
            scale, translation = transforms_of(entry.get("coordinateTransformations"), len(names), corrupt, need_scale=True)
        scale, translation = scale * global_scale, translation * global_scale + global_translation
        if np.any(scale <= 0):
            raise corrupt(f"level {entry['path']} has a non-positive scale {scale.tolist()}")
        order = [names.index(a) for a in AXES]
        levels.append(Level(
            entry["path"],
            tuple(float(scale[i] * factors[i]) for i in order),
            tuple(float(translation[i] * factors[i]) for i in order),
        ))
    return Multiscale(url, driver, tuple(levels), tuple(names.index(a) for a in AXES))


def axis_names_and_units(axes: Any, corrupt, units: Any = None) -> tuple[list[str], list[float]]:
    """Axis names and nm per unit; missing axes mean z, y, x in nm (CellMap's convention)."""
    if axes is None:
        return list(AXES), [1.0] * 3
    if not isinstance(axes, list):
        raise corrupt("'axes' is not a list")
    names = [a.get("name") if isinstance(a, dict) else a for a in axes]
    if sorted(map(str, names)) != sorted(AXES):
        raise corrupt(f"axes {names} are not the three spatial axes z, y, x")
    unit_names = units or [a.get("unit", "nanometer") if isinstance(a, dict) else "nanometer" for a in axes]
    unknown = [u for u in unit_names if u not in UNIT_TO_NM]
    if unknown:
        raise corrupt(f"unknown unit(s) {unknown}; use nanometer")
    return names, [UNIT_TO_NM[u] for u in unit_names]


def transforms_of(transforms: Any, n: int, corrupt, need_scale: bool = False) -> tuple[np.ndarray, np.ndarray]:
    scale, translation = np.ones(n), np.zeros(n)
    if not isinstance(transforms, list):
        raise corrupt("a level without 'coordinateTransformations'")
    kinds = set()
    for t in transforms:
        kind = t.get("type") if isinstance(t, dict) else None
        if kind not in ("scale", "translation"):
            raise corrupt(f"unsupported coordinate transformation {t!r}")
        values = t.get(kind)
        if not isinstance(values, list) or len(values) != n or not all(isinstance(v, (int, float)) for v in values):
            raise corrupt(f"{kind} {values!r} is not {n} numbers")
        kinds.add(kind)
        if kind == "scale":
            scale = np.asarray(values, float)
        else:
            translation = np.asarray(values, float)
    if need_scale and "scale" not in kinds:
        raise corrupt("a level without a 'scale' transformation")
    return scale, translation


def choose_level(multiscale: Multiscale, target_nm: float, what: str, option: str) -> tuple[Level, bool]:
    """The level at target_nm on every axis, else the coarsest finer one (resampled: True)."""
    for level in multiscale.levels:
        if all(abs(s - target_nm) <= TOLERANCE * target_nm for s in level.scale):
            return level, False
    finer = [lv for lv in multiscale.levels if all(s <= target_nm * (1 + TOLERANCE) for s in lv.scale)]
    if not finer:
        finest = min(multiscale.levels, key=lambda lv: max(lv.scale))
        raise SourceError(
            f"{what} at {target_nm:g} nm ({option}) is finer than every level of {multiscale.url} "
            f"(finest {format_voxel(finest.scale)} nm); use {option} {max(finest.scale):g} or coarser"
        )
    return max(finer, key=lambda lv: np.prod(lv.scale)), True


def format_voxel(scale: Sequence[float]) -> str:
    return "x".join(f"{s:g}" for s in scale)


@dataclass
class LevelArray:
    """One opened level, indexed z, y, x, with its world placement."""

    multiscale: Multiscale
    level: Level
    resampled: bool
    store: ts.TensorStore

    @property
    def url(self) -> str:
        return join_url(self.multiscale.url, self.level.path)

    @property
    def shape(self) -> np.ndarray:
        return np.asarray(self.store.shape)

    @property
    def lo(self) -> np.ndarray:
        return self.level.corner

    @property
    def hi(self) -> np.ndarray:
        return self.level.corner + self.shape * np.asarray(self.level.scale)

    def describe(self) -> dict:
        return {
            "group": self.multiscale.url,
            "level": self.level.path,
            "voxel_size_nm": list(self.level.scale),
            "translation_nm": list(self.level.translation),
            "shape": self.shape.tolist(),
            "resampled": self.resampled,
        }


def open_level(multiscale: Multiscale, target_nm: float, what: str, option: str, storage: Storage) -> LevelArray:
    level, resampled = choose_level(multiscale, target_nm, what, option)
    return open_level_array(multiscale, level, resampled, storage)


def open_level_array(multiscale: Multiscale, level: Level, resampled: bool, storage: Storage) -> LevelArray:
    """One level of the group opened for reading, indexed z, y, x."""
    url = join_url(multiscale.url, level.path)
    try:
        store = ts.open(
            {"driver": multiscale.driver, "kvstore": kvstore_spec(url, storage.s3), "open": True},
            read=True, write=False, context=storage.context,
        ).result()
    except (ValueError, RuntimeError) as e:
        if "NOT_FOUND" in str(e):
            raise SourceError(f"level {level.path} listed in {multiscale.url} has no array at {url}; fix the metadata or the data") from None
        raise storage_error(url, e, storage.s3) from None
    if store.rank != 3:
        raise SourceError(f"{url} has {store.rank} dimensions; expected 3 (z, y, x)")
    if multiscale.driver == "n5":
        store = store.T  # N5 lists dimensions fastest-first (x, y, z); metadata axes are in C order
    if multiscale.axis_order != (0, 1, 2):
        store = store[ts.d[list(multiscale.axis_order)].transpose[:]]
    return LevelArray(multiscale, level, resampled, store)
