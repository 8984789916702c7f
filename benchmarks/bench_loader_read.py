#!/usr/bin/env python
"""Whole-volume warm reads: this loader against numpy.fromfile and zarr-python 3, one run.

    python -m benchmarks.bench_loader_read [--cache DIR] [--kind c1024|c1024-yx] [--rounds 5] [--num-threads 8]

Reads volume 0 (features + gt + mask) of a C=1024, 64^3, float16 cache with default chunks
(--kind c1024-yx: chunks (256,16,64,64), spanning y and x; built once by the extraction CLI if
--cache holds no volume). Everything is warm: the files
are read once first and their page-cache residency is printed. Each round times every
variant once, in turn, so that load from other processes hits them alike; the table gives
the minimum and median wall time and the minimum CPU time of this process.

Ratios (targets from the issue):
  (1) loader GB/s / numpy.fromfile GB/s on the same files        target >= 0.8
      (also against readinto() into one reused buffer: fromfile allocates an array per file,
      and fresh memory costs page faults, so that is the stricter baseline)
  (2) zarr-python 3 time / loader time on the same arrays        target >= 1.5
The TensorStore rows show where a default TensorStore read loses time; the last table shows
what the scatter of chunks into the (C, D, H, W) batch costs for other chunk shapes.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import tensorstore as ts
import torch
import zarr

from benchmarks.loader_bench_cache import ensure_cache
from dinov3_cache.loader.page_cache import describe_residency, volume_files
from dinov3_cache.zarr_arrays import open_array, ts_context
from preprocessed_dataloader import PreprocessedDINOv3Dataset

ARRAYS = ("features", "gt", "mask")


def variants(cache: Path, num_threads: int) -> dict:
    stored = PreprocessedDINOv3Dataset(cache, volume_indices=[0], num_threads=num_threads, features_dtype=None, gt_dtype=None)
    via_ts = PreprocessedDINOv3Dataset(cache, volume_indices=[0], num_threads=num_threads, features_dtype=None,
                                       gt_dtype=None, reader="tensorstore")
    as_float32 = PreprocessedDINOv3Dataset(cache, volume_indices=[0], num_threads=num_threads)
    fresh = PreprocessedDINOv3Dataset(cache, volume_indices=[0], num_threads=num_threads, features_dtype=None,
                                      gt_dtype=None, reuse_memory=False)
    volume = stored.volumes[0]
    paths = [volume.array_path(a) for a in ARRAYS]
    chunk_files = [f for f in volume_files([volume]) if f.suffix != ".json" and not f.name.startswith(".")]
    zarr_arrays = [zarr.open_array(p, mode="r") for p in paths]
    default_stores = [open_array(p) for p in paths]
    tuned = ts_context(num_threads)
    tuned_stores = [open_array(p, tuned) for p in paths]
    outputs = [np.empty(s.shape, s.dtype.numpy_dtype) for s in tuned_stores]
    reusable = np.empty(max(os.path.getsize(f) for f in chunk_files), np.uint8)

    def read_into_one_buffer():
        for f in chunk_files:
            with open(f, "rb", buffering=0) as handle:
                handle.readinto(reusable)

    return {
        "numpy.fromfile (chunk files, page cache)": (lambda: [np.fromfile(f, dtype=np.uint8) for f in chunk_files]),
        "readinto one reused buffer (page cache)": read_into_one_buffer,
        "zarr-python 3 a[...]": (lambda: [a[...] for a in zarr_arrays]),
        "TensorStore default: read()": (lambda: [s.read().result() for s in default_stores]),
        f"TensorStore {num_threads} threads: read()": (lambda: [s.read().result() for s in tuned_stores]),
        f"TensorStore {num_threads} threads: write into preallocated": (
            lambda: [f.result() for f in [ts.array(o, copy=False, write=True).write(s) for o, s in zip(outputs, tuned_stores)]]
        ),
        "loader reader=tensorstore (stored dtypes)": (lambda: via_ts.read_batch([0])),
        "loader reader=auto (stored dtypes)": (lambda: stored.read_batch([0])),
        "loader reader=auto, fresh memory (reuse_memory=False)": (lambda: fresh.read_batch([0])),
        "loader reader=auto, features float32 (API default)": (lambda: as_float32.read_batch([0])),
    }, chunk_files


def contiguous_run(shape: tuple[int, ...], chunk: tuple[int, ...]) -> int:
    """Elements a chunk holds contiguously in the C-order array: trailing full axes, then one partial."""
    run = 1
    for s, c in zip(reversed(shape), reversed(chunk)):
        run *= c
        if c < s:
            break
    return run


def copy_cost_by_chunk_shape(shape: tuple[int, ...], repeats: int = 3) -> None:
    """What the scatter into (C, D, H, W) costs per chunk shape: the same bytes, copied in memory."""
    out = torch.ones(shape, dtype=torch.float16)
    print(f"\ncopy of {out.numel() * 2 / 1e6:.0f} MB of float16 chunks into a {list(shape)} array (torch copy_, in memory):")
    for chunk in [(256, 16, 16, 16), (256, 16, 16, shape[3]), (256, 16, shape[2], shape[3])]:
        src = torch.rand(chunk).half()
        origins = itertools.product(*[range(0, s, c) for s, c in zip(shape, chunk)])
        regions = [tuple(slice(o, o + c) for o, c in zip(origin, chunk)) for origin in origins]
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            for region in regions:
                out[region].copy_(src)
            best = min(best, time.perf_counter() - started)
        print(f"  chunks {str(list(chunk)):22s} contiguous runs of {contiguous_run(shape, chunk) * 2:5d} bytes: {best * 1e3:7.1f} ms")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--cache", type=Path, default=None, help="a cache like the 'c1024' one (default: build it in /tmp)")
    parser.add_argument("--kind", choices=("c1024", "c1024-yx"), default="c1024", help="which cache to build (default: c1024)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--num-threads", type=int, default=8)
    args = parser.parse_args()
    cache = ensure_cache(args.kind, 1, args.cache)
    table, files = variants(cache, args.num_threads)
    nbytes = sum(os.path.getsize(f) for f in files)
    for fn in table.values():  # warm the page cache and every code path
        fn()
    print(f"cache {cache}, volume 0: {len(files)} chunk files, {nbytes / 1e6:.1f} MB; "
          f"page cache: {describe_residency(files)}")
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; torch threads {torch.get_num_threads()}; "
          f"rounds {args.rounds}")
    wall: dict[str, list[float]] = {k: [] for k in table}
    cpu: dict[str, list[float]] = {k: [] for k in table}
    for _ in range(args.rounds):
        for name, fn in table.items():
            started, started_cpu = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - started)
            cpu[name].append(time.process_time() - started_cpu)
    print(f"\n{'variant':58s} {'min ms':>8s} {'median':>8s} {'GB/s':>6s} {'CPU ms':>8s}")
    for name in table:
        best = min(wall[name])
        print(f"{name:58s} {best * 1e3:8.1f} {statistics.median(wall[name]) * 1e3:8.1f} "
              f"{nbytes / best / 1e9:6.2f} {min(cpu[name]) * 1e3:8.1f}")
    loader, baseline, zarr_name = "loader reader=auto (stored dtypes)", "numpy.fromfile (chunk files, page cache)", "zarr-python 3 a[...]"
    print(f"\n(1) loader GB/s / numpy.fromfile GB/s: {min(wall[baseline]) / min(wall[loader]):.2f} (min times), "
          f"{statistics.median(wall[baseline]) / statistics.median(wall[loader]):.2f} (medians); target >= 0.8")
    best = "readinto one reused buffer (page cache)"
    print(f"    loader GB/s / readinto-one-buffer GB/s (the fastest way to get these bytes): "
          f"{min(wall[best]) / min(wall[loader]):.2f} (min times), "
          f"{statistics.median(wall[best]) / statistics.median(wall[loader]):.2f} (medians); target >= 0.8")
    print(f"(2) zarr-python 3 time / loader time: {min(wall[zarr_name]) / min(wall[loader]):.2f} (min times), "
          f"{statistics.median(wall[zarr_name]) / statistics.median(wall[loader]):.2f} (medians); target >= 1.5")
    default_ts = "TensorStore default: read()"
    print(f"    TensorStore default read() time / loader time: {min(wall[default_ts]) / min(wall[loader]):.2f}; "
          f"reader=tensorstore / reader=auto: {min(wall['loader reader=tensorstore (stored dtypes)']) / min(wall[loader]):.2f}")
    copy_cost_by_chunk_shape(tuple(PreprocessedDINOv3Dataset(cache, volume_indices=[0]).volumes[0].features_shape))
    return 0


if __name__ == "__main__":
    sys.exit(main())
