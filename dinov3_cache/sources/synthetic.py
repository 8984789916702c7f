"""The built-in synthetic source: an EM-like world per volume index, so everything runs offline."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from dinov3_cache.geometry import AxisTransform, CropGeometry
from dinov3_cache.sources.base import (
    SamplingOptions,
    SourceCrop,
    SourceError,
    VolumeSource,
    combine_organelle_labels,
    draw_passing_crop,
)
from dinov3_cache.sources.signatures import CURRENT, SIGNATURE_FORMAT, STALE, Change, SourceStatus, field_of

# what makes the synthetic crops: a new version whenever a change of SyntheticWorld changes them
GENERATOR = {"name": "SyntheticWorld", "version": 1}


class SyntheticSource(VolumeSource):
    """A deterministic EM-like world per volume index, so everything runs offline.

    Cells are Voronoi regions with dark membranes and textured cytoplasm; some hold a
    nucleus (``nuc``); mitochondria (``mito``) are small dark ellipsoids with cristae.
    Labels: ``cell`` (instances), ``nuc`` (instances), ``mito`` (instances).
    """

    name = "synthetic"
    summary = "built-in, offline demo data"
    choice_hint = "--source synthetic for the built-in demo data"
    ORGANELLES = ("cell", "nuc", "mito")

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> SyntheticSource:
        return cls()  # no options: the volume index decides everything

    def preflight(self, options: SamplingOptions, geometry: CropGeometry) -> None:
        """Only the synthetic organelles."""
        unknown = [o for o in options.organelles if o not in self.ORGANELLES]
        if unknown:
            raise SourceError(
                f"unknown organelle(s) {', '.join(unknown)} for --source synthetic; "
                f"choose from {', '.join(self.ORGANELLES)}"
            )

    def sample(self, volume_index: int, geometry: CropGeometry, options: SamplingOptions) -> SourceCrop:
        self.preflight(options, geometry)
        if options.crop_filter or options.inference_filter:  # refused by the job (exit status 1), as before
            raise SourceError("--crop-filter and --inference-filter name real datasets; --source synthetic has none")
        crop = draw_passing_crop(volume_index, options, lambda rng: self._draw(volume_index, rng, geometry, options))
        crop.record_world_transform(AxisTransform())
        crop.description["signature"] = self.signature(volume_index, geometry, options)
        return crop

    def signature(self, volume_index: int, geometry: CropGeometry, options: SamplingOptions) -> dict:
        """The generator (name and version), its parameters and its seed: they decide the crop."""
        return {
            "format": SIGNATURE_FORMAT, "source": self.name, "generator": dict(GENERATOR),
            "parameters": {"extent_nm": geometry.extent_nm, "slice_size": geometry.slice_size,
                           "output_image_dim": geometry.output_image_dim, **options.fingerprint_values()},
            "seed": [volume_index, 0],
        }

    def check_signature(self, signature: dict, description: dict) -> SourceStatus:
        """Current while the generator is the one that made the crop (its parameters and seed
        are the volume's own settings)."""
        recorded = field_of(signature, "generator", dict, "source_dataset.signature")
        if recorded == GENERATOR:
            return SourceStatus(CURRENT)
        return SourceStatus(STALE, changes=[Change("generator", "metadata", [f"{recorded} -> {GENERATOR}"], True)])

    def _draw(
        self, volume_index: int, rng: np.random.Generator, geometry: CropGeometry, options: SamplingOptions
    ) -> SourceCrop:
        world = SyntheticWorld(rng, geometry.extent_nm)
        raw = world.render_raw(geometry.slice_size, rng)
        labels = world.labels(geometry.output_image_dim)
        gt = combine_organelle_labels(labels, options.organelles)
        mask = None
        if options.gt_extension:
            mask = annotated_box_mask(rng, gt.shape)
            gt = gt * mask.astype(gt.dtype)
        return SourceCrop(
            raw=raw,
            gt=gt,
            mask=mask,
            raw_range=(0.0, 255.0),
            offset_nm=(0.0, 0.0, 0.0),
            description={
                "index": volume_index,
                "name": "synthetic",
                "paths": {"raw": f"synthetic://{volume_index}/raw"}
                | {o: f"synthetic://{volume_index}/{o}" for o in options.organelles},
                "voxel_size_nm": {"raw": [geometry.min_resolution_for_raw] * 3, "labels": [geometry.base_resolution] * 3},
                "offset_nm": [0.0, 0.0, 0.0],
            },
            geometry=geometry,
        )


def annotated_box_mask(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """A random annotated box covering 60-100 % of each axis: GT extension reaches past it."""
    mask = np.zeros(shape, np.uint8)
    box = []
    for n in shape:
        length = int(rng.integers(int(0.6 * n), n + 1))
        start = int(rng.integers(0, n - length + 1))
        box.append(slice(start, start + length))
    mask[tuple(box)] = 1
    return mask


class SyntheticWorld:
    """Geometry of one synthetic volume in world units (nm), evaluated on any grid."""

    def __init__(self, rng: np.random.Generator, extent: float):
        self.extent = extent
        n_cells = int(rng.integers(6, 14))
        margin = 0.25 * extent
        self.cell_centres = rng.uniform(-margin, extent + margin, (n_cells, 3))
        cell_radius = extent / n_cells ** (1 / 3)
        self.membrane_nm = 0.02 * extent
        self.has_nucleus = rng.random(n_cells) < 0.6
        self.nucleus_radius = rng.uniform(0.25, 0.4, n_cells) * cell_radius
        n_mito = int(rng.integers(8, 20))
        self.mito_centres = rng.uniform(0, extent, (n_mito, 3))
        self.mito_radii = rng.uniform(0.03, 0.07, (n_mito, 3)) * extent
        self.texture = rng.standard_normal((12, 12, 12)).astype(np.float32)
        self.cristae_phase = rng.uniform(0, 2 * np.pi)

    def _fields(self, n: int, z_lo: int = 0, z_hi: int | None = None) -> dict[str, np.ndarray]:
        """Cell id, membrane, nucleus id and mito id on an n^3 grid (rows z_lo:z_hi)."""
        z_hi = n if z_hi is None else z_hi
        step = self.extent / n
        zc = ((np.arange(z_lo, z_hi) + 0.5) * step)[:, None, None]
        yc = ((np.arange(n) + 0.5) * step)[None, :, None]
        xc = yc.reshape(1, 1, n)
        shape = (z_hi - z_lo, n, n)
        nearest = np.full(shape, np.inf, np.float32)
        second = np.full(shape, np.inf, np.float32)
        cell = np.zeros(shape, np.uint32)
        for i, (cz, cy, cx) in enumerate(self.cell_centres):
            d = np.sqrt(((zc - cz) ** 2 + (yc - cy) ** 2 + (xc - cx) ** 2).astype(np.float32))
            closer = d < nearest
            second = np.where(closer, nearest, np.minimum(second, d))
            nearest = np.where(closer, d, nearest)
            cell[closer] = i + 1
        membrane = (second - nearest) < self.membrane_nm
        nucleus = np.zeros(shape, np.uint32)
        for i, (cz, cy, cx) in enumerate(self.cell_centres):
            if self.has_nucleus[i]:
                d2 = (zc - cz) ** 2 + (yc - cy) ** 2 + (xc - cx) ** 2
                nucleus[(d2 < self.nucleus_radius[i] ** 2) & (cell == i + 1) & ~membrane] = i + 1
        mito = np.zeros(shape, np.uint32)
        mito_shell = np.zeros(shape, bool)
        for i, ((mz, my, mx), (rz, ry, rx)) in enumerate(zip(self.mito_centres, self.mito_radii)):
            q = ((zc - mz) / rz) ** 2 + ((yc - my) / ry) ** 2 + ((xc - mx) / rx) ** 2
            inside = (q < 1) & (nucleus == 0) & ~membrane
            mito[inside] = i + 1
            mito_shell |= inside & (q > 0.7)
        cell[membrane] = 0
        return {"cell": cell, "membrane": membrane, "nuc": nucleus, "mito": mito, "mito_shell": mito_shell}

    def labels(self, n: int) -> dict[str, np.ndarray]:
        fields = self._fields(n)
        return {k: fields[k] for k in SyntheticSource.ORGANELLES}

    def render_raw(self, n: int, rng: np.random.Generator, rows_per_block: int = 32) -> np.ndarray:
        raw = np.empty((n, n, n), np.uint8)
        texture = smooth_noise(self.texture, n)
        for z0 in range(0, n, rows_per_block):
            z1 = min(n, z0 + rows_per_block)
            f = self._fields(n, z0, z1)
            tex = texture[z0:z1]
            value = 160 + 25 * tex
            value = np.where(f["nuc"] > 0, 120 + 15 * tex, value)
            z = np.arange(z0, z1, dtype=np.float32)[:, None, None] * (self.extent / n)
            cristae = np.sin(z / (0.01 * self.extent) + self.cristae_phase)
            value = np.where(f["mito"] > 0, 95 + 25 * cristae, value)
            value = np.where(f["mito_shell"], 55, value)
            value = np.where(f["membrane"], 40, value)
            value = value + rng.normal(0, 10, value.shape)
            raw[z0:z1] = np.clip(value, 0, 255).astype(np.uint8)
        return raw


def smooth_noise(coarse: np.ndarray, n: int) -> np.ndarray:
    """Trilinear upsampling of a coarse random grid to n^3: a smooth cytoplasm texture."""
    import torch
    import torch.nn.functional as F

    grid = torch.from_numpy(coarse)[None, None]
    return F.interpolate(grid, size=(n, n, n), mode="trilinear", align_corners=False)[0, 0].numpy()
