#!/usr/bin/env python
"""Random 64^3 crops: bytes read from disk / bytes returned, default chunks (256,16,16,16).

    python -m benchmarks.bench_loader_crops [--cache DIR] [--crops 20] [--crop 64]

Volume 0 of a C=256, 128^3, float16 cache (built once by the extraction CLI if --cache holds
no volume). Before every crop all files of the volume are evicted from the page cache
(fsync + posix_fadvise DONTNEED), so each crop is read cold; the bytes come from this
process's /proc/self/io: read_bytes (fetched from the block device) and rchar (returned by
read calls). "Returned" is the crop's features + gt + mask in their stored dtypes. The
"chunk geometry" column is the size of the chunk files the crop overlaps: what a reader of
whole chunks must read. Target from the issue: disk / returned <= 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

from benchmarks.loader_bench_cache import ensure_cache
from dinov3_cache.loader.array_readers import chunk_overlaps
from dinov3_cache.loader.page_cache import evict_from_page_cache, io_counters, volume_files
from dinov3_cache.zarr_arrays import storage_chunks
from preprocessed_dataloader import PreprocessedDINOv3Dataset

ARRAYS = ("features", "gt", "mask")


def overlapped_chunk_bytes(volume, spatial: tuple[slice, ...]) -> int:
    """Bytes of the chunk files a crop overlaps (uncompressed zarr v2: every chunk file is full size)."""
    total = 0
    for array in ARRAYS:
        path = volume.array_path(array)
        chunks = storage_chunks(path)
        itemsize = np.dtype(volume.metadata.dtypes[array]).itemsize
        region = ((slice(0, volume.features_shape[0]),) if array == "features" else ()) + spatial
        total += sum(1 for _ in chunk_overlaps(region, chunks)) * int(np.prod(chunks)) * itemsize
    return total


def measure(cache: Path, reader: str, crops: int, crop: int) -> dict:
    dataset = PreprocessedDINOv3Dataset(cache, volume_indices=[0], crop_size=(crop,) * 3, samples_per_volume=crops,
                                        features_dtype=None, gt_dtype=None, reader=reader, seed=0)
    volume = dataset.volumes[0]
    files = volume_files([volume])
    dataset.resources.reader(volume)  # open the arrays (their small metadata files) before counting
    totals = {"disk": 0, "rchar": 0, "returned": 0, "geometry": 0}
    for i in range(crops):
        evict_from_page_cache(files)
        before = io_counters()
        batch = dataset.read_batch([i])
        after = io_counters()
        totals["disk"] += after["read_bytes"] - before["read_bytes"]
        totals["rchar"] += after["rchar"] - before["rchar"]
        totals["returned"] += sum(t.numel() * t.element_size() for t in (batch.features, batch.gt, batch.mask))
        totals["geometry"] += overlapped_chunk_bytes(volume, dataset.sample(i).spatial)
    return totals


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--cache", type=Path, default=None, help="a cache like the 'c256x128' one (default: build it in /tmp)")
    parser.add_argument("--crops", type=int, default=20)
    parser.add_argument("--crop", type=int, default=64)
    parser.add_argument("--kind", choices=("c256x128", "c256x128-yx"), default="c256x128",
                        help="which cache to build: default chunks, or chunks spanning y and x (256,16,128,128)")
    args = parser.parse_args()
    cache = ensure_cache(args.kind, 1, args.cache)
    probe = PreprocessedDINOv3Dataset(cache, volume_indices=[0])
    volume = probe.volumes[0]
    print(f"cache {cache}: features {list(volume.features_shape)} {volume.metadata.dtypes['features']}, "
          f"chunks {list(storage_chunks(volume.array_path('features')))} (gt/mask {list(storage_chunks(volume.array_path('gt')))}); "
          f"{args.crops} random {args.crop}^3 crops, each read cold")
    print(f"\n{'reader':12s} {'returned MB':>12s} {'disk MB':>9s} {'rchar MB':>9s} {'disk/returned':>14s} "
          f"{'rchar/returned':>15s} {'chunk geometry':>15s}")
    for reader in ("auto", "tensorstore"):
        t = measure(cache, reader, args.crops, args.crop)
        disk = "n/a" if t["disk"] == 0 else f"{t['disk'] / t['returned']:.2f}"
        print(f"{reader:12s} {t['returned'] / 1e6:12.1f} {t['disk'] / 1e6:9.1f} {t['rchar'] / 1e6:9.1f} {disk:>14s} "
              f"{t['rchar'] / t['returned']:15.2f} {t['geometry'] / t['returned']:15.2f}")
    chunk = storage_chunks(volume.array_path("features"))[1]
    per_axis = (args.crop // chunk + (chunk - 1) / chunk) * chunk / args.crop if args.crop % chunk == 0 else float("nan")
    print(f"\nexpected for uniformly random offsets (features, chunk edge {chunk}): {per_axis:.3f}^3 = {per_axis ** 3:.2f}; "
          "target disk/returned <= 2")
    if os.path.exists("/proc/self/io") and not t["disk"]:
        print("read_bytes stayed 0: this file system does not account device reads; rchar and geometry still hold")
    return 0


if __name__ == "__main__":
    sys.exit(main())
