#!/usr/bin/env python
"""Read one crop at the seed's geometry from local CellMap-layout zarr, against a plain file.

    python -m benchmarks.bench_source_read [--workdir DIR] [--repeats 5] [--compression zstd]

Builds a dataset (raw 576^3 uint8 at 32 nm in 64^3 chunks, a ground-truth crop of 144^3
uint64 instance ids at 128 nm), then times CellMapSource.sample for a 512^3 raw + 128^3
label crop (base 128 nm, raw 32 nm, output 128) against reading the same number of bytes
from one plain file into a fresh buffer, interleaved, page cache warm for all. Prints
medians of: the crop read (open levels, read raw + labels + mask: the source's I/O), the
full CellMapSource.sample (adds the draw and the label-filter measurement), and a bare
TensorStore read of the raw region (the floor for any TensorStore reader), each as a
ratio to the plain file (target for the crop read <= 2).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from dinov3_cache.sources.base import CropGeometry, LabelFilters, SamplingOptions
from dinov3_cache.sources.cellmap import CellMapSource, Storage, eligible_units, prepare_catalog
from tests.cellmap_data import crop_group, level_translation, ome_multiscales, raw_group, write_array, write_group_attributes

REPO = Path(__file__).resolve().parents[1]

RAW_VOXELS, RAW_NM = 576, 32.0
LABEL_VOXELS, LABEL_NM = 144, 128.0
GEOMETRY = CropGeometry(base_resolution=128.0, min_resolution_for_raw=32.0, output_image_dim=128)


def build_dataset(root: Path, compression: str | None) -> None:
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, (RAW_VOXELS,) * 3, dtype=np.uint8)
    group = raw_group(root, "jrc_bench")
    write_array(group / "s0", raw, "zarr", (64, 64, 64), compression)
    write_group_attributes(group, "zarr", ome_multiscales([("s0", [RAW_NM] * 3, level_translation([0, 0, 0], [RAW_NM] * 3))]))
    labels = (rng.integers(0, 50, (LABEL_VOXELS,) * 3) + 2**33).astype(np.uint64)
    group = crop_group(root, "jrc_bench", "crop1", "mito")
    write_array(group / "s0", labels, "zarr", (64, 64, 64), compression)
    write_group_attributes(group, "zarr", ome_multiscales([("s0", [LABEL_NM] * 3, level_translation([0, 0, 0], [LABEL_NM] * 3))]))


def plain_file_read(path: Path, nbytes: int) -> float:
    buffer = np.empty(nbytes, np.uint8)
    t = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        view = memoryview(buffer)
        done = 0
        while done < nbytes:
            done += f.readinto(view[done:])
    return time.perf_counter() - t


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=None, help="where the dataset is written (default a temporary directory)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compression", default=None, choices=["zstd"], help="compress the zarr chunks (default none)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        root = Path(tmp) / "data"
        t = time.perf_counter()
        build_dataset(root, args.compression)
        print(f"dataset written in {time.perf_counter() - t:.1f} s ({'zstd' if args.compression else 'uncompressed'} 64^3 chunks)")
        storage = Storage()
        source = CellMapSource(prepare_catalog(str(root), None, None, storage), storage)
        options = SamplingOptions(organelles=("mito",), filters=LabelFilters(0.0, 0, 0.0))
        crop = source.sample(0, GEOMETRY, options)  # warms the page cache and the metadata
        nbytes = crop.raw.nbytes + crop.gt.nbytes
        plain = Path(tmp) / "plain.bin"
        plain.write_bytes(np.random.default_rng(1).integers(0, 256, nbytes, dtype=np.uint8).tobytes())
        plain_file_read(plain, nbytes)
        unit = source.resolve(eligible_units(source.catalog, options)[0], GEOMETRY)
        raw_store = unit.raw.store

        def full_sample(index: int) -> None:  # draw, read, measure the filters (shared draw_passing_crop)
            CellMapSource(source.catalog, storage).sample(index, GEOMETRY, options)

        def crop_read(index: int) -> None:  # open the levels and read raw + labels + mask at a fixed place
            fresh = CellMapSource(source.catalog, storage)
            resolved = fresh.resolve(unit.unit, GEOMETRY)
            fresh.read_crop(resolved, 0, np.array([4.0, 4.0, 4.0]) * RAW_NM * (1 + index % 3), GEOMETRY, options)

        def store_read(index: int) -> None:  # TensorStore alone: the raw region, no labels
            o = 4 * (1 + index % 3)
            raw_store[o : o + GEOMETRY.slice_size, o : o + GEOMETRY.slice_size, o : o + GEOMETRY.slice_size].read().result()

        timings = {"plain": [], "crop read": [], "full sample": [], "tensorstore raw only": []}
        for index in range(args.repeats):
            for name, fn in (("crop read", crop_read), ("full sample", full_sample), ("tensorstore raw only", store_read)):
                t = time.perf_counter()
                fn(index)
                timings[name].append(time.perf_counter() - t)
            timings["plain"].append(plain_file_read(plain, nbytes))
        medians = {name: statistics.median(values) for name, values in timings.items()}
        best = {name: min(values) for name, values in timings.items()}
        print(f"crop: raw {crop.raw.shape} {crop.raw.dtype}, labels {crop.gt.shape} {crop.gt.dtype}: {nbytes / 1e6:.1f} MB; "
              f"median of {args.repeats}, page cache warm")
        print(f"{'plain file, same bytes':>22}: median {medians['plain']:.3f} s, best {best['plain']:.3f} s  "
              f"({', '.join(f'{x:.3f}' for x in timings['plain'])})")
        for name in ("crop read", "full sample", "tensorstore raw only"):
            print(f"{name:>22}: median {medians[name]:.3f} s, best {best[name]:.3f} s  ratio {medians[name] / medians['plain']:.2f} "
                  f"(best/best {best[name] / best['plain']:.2f})  ({', '.join(f'{x:.3f}' for x in timings[name])})")
        print(f"ratio crop read / plain file: median {medians['crop read'] / medians['plain']:.2f}, "
              f"best/best {best['crop read'] / best['plain']:.2f} (target <= 2)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
