#!/usr/bin/env python
"""Write path: TensorStore feature writes against a plain sequential file write of the same bytes.

    python -m benchmarks.bench_write_path [--channels 1024] [--dim 64] [--repeats 2]

The TensorStore side is the pipeline's own writer (AsyncBlockWriter: slab blocks of one
write unit, written asynchronously, per-chunk crc32s, every write awaited, each chunk
file fsynced by TensorStore). The baseline writes the same bytes to one file with
Python and fsyncs it. Each chunk layout is timed against a baseline measured right
before it. Target: >= 0.5.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from dinov3_cache.extraction.writer import AsyncBlockWriter
from dinov3_cache.zarr_arrays import StorageOptions, create_array, feature_chunks, ts_context, write_unit

LAYOUTS = [
    ("v2 (256,16,16,16)", StorageOptions(feature_chunks=(256, 16, 16, 16))),
    ("v2 (256,32,32,32)", StorageOptions(feature_chunks=(256, 32, 32, 32))),
    ("v2 (64,64,64,64)", StorageOptions(feature_chunks=(64, 64, 64, 64))),
    ("v2 (1024,8,8,8)", StorageOptions(feature_chunks=(1024, 8, 8, 8))),
    ("v3 sharded (256,16,16,16)", StorageOptions(zarr_format=3, feature_chunks=(256, 16, 16, 16))),
    ("v2 lz4 (256,16,16,16)", StorageOptions(compression="lz4", feature_chunks=(256, 16, 16, 16))),
    ("v2 zstd (256,16,16,16)", StorageOptions(compression="zstd", feature_chunks=(256, 16, 16, 16))),
]


def plain_write_seconds(path: Path, block: np.ndarray, n_blocks: int) -> float:
    started = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(n_blocks):
            f.write(memoryview(block).cast("B"))
        f.flush()
        os.fsync(f.fileno())
    return time.perf_counter() - started


def tensorstore_write_seconds(path: Path, shape, storage: StorageOptions, features: np.ndarray) -> float:
    chunks = feature_chunks(shape, storage.feature_chunks)
    unit = write_unit(shape, chunks, storage.zarr_format)
    store = create_array(path, shape, "float16", chunks, storage, ts_context(storage.num_threads), {}, ["c", "z", "y", "x"])
    writer = AsyncBlockWriter()
    started = time.perf_counter()
    for z in range(0, shape[1], unit[1]):
        for c in range(0, shape[0], unit[0]):
            block = np.ascontiguousarray(features[c : c + unit[0], z : z + unit[1]])
            writer.write("features", store, (c, z, 0, 0), block, chunks)
    writer.flush()
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--channels", type=int, default=1024)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dir", default=".", help="where to write (the file system under test)")
    parser.add_argument("--default-only", action="store_true", help="only the default layout")
    args = parser.parse_args()
    shape = (args.channels, args.dim, args.dim, args.dim)
    # smooth-ish values like real features, so compression numbers are not those of noise
    rng = np.random.default_rng(0)
    features = (rng.standard_normal(shape, dtype=np.float32) * 0.1 + np.linspace(-1, 1, args.dim)[None, :, None, None]).astype(np.float16)
    nbytes = features.nbytes
    print(f"features {shape} float16 = {nbytes / 1e9:.2f} GB per write, directory {os.path.abspath(args.dir)}")
    print(f"{'layout':28s} {'TensorStore GB/s':>17s} {'plain GB/s':>11s} {'ratio':>6s} {'on disk GB':>11s}")
    for name, storage in LAYOUTS[:1] if args.default_only else LAYOUTS:
        ratios, ts_rates, plain_rates = [], [], []
        for _ in range(args.repeats):
            tmp = Path(tempfile.mkdtemp(prefix="bench_write_", dir=args.dir))
            try:
                plain = plain_write_seconds(tmp / "plain.bin", features, 1)
                (tmp / "plain.bin").unlink()
                tsw = tensorstore_write_seconds(tmp / "features.zarr", shape, storage, features)
                on_disk = sum(f.stat().st_blocks * 512 for f in (tmp / "features.zarr").rglob("*") if f.is_file())
            finally:
                shutil.rmtree(tmp)
            ratios.append(plain / tsw)
            ts_rates.append(nbytes / tsw / 1e9)
            plain_rates.append(nbytes / plain / 1e9)
        print(f"{name:28s} {statistics.median(ts_rates):17.2f} {statistics.median(plain_rates):11.2f} "
              f"{statistics.median(ratios):6.2f} {on_disk / 1e9:11.3f}")
    print("ratio = TensorStore GB/s / plain sequential write GB/s, median of repeats (target >= 0.5)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
