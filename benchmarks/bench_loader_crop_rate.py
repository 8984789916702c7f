#!/usr/bin/env python
"""Random 64^3 crops, warm: the loader against a memory-mapped torch tensor, one run.

    python -m benchmarks.bench_loader_crop_rate [--cache DIR] [--rounds 12] [--crop 64] [--num-threads 8]

Volume 0 of the C=256, 128^3, float16 "c256x128" cache (default chunks (256,16,16,16); built
once by the extraction CLI if --cache holds no volume). The baseline is what a user gets
without this package: the same features saved once as one float16 tensor (torch.save, next
to the cache), opened with torch.load(path, mmap=True), sliced to the crop and cast with
.float(). The loader delivers the crop's features in float32 (its default) plus gt and mask.
Both read the same random crops, from warm page cache (every file is read once first). Each
round times both, in turn, so that load from other processes hits them alike.

Target (from the issue): loader crops/s / baseline crops/s >= 1.0.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks.loader_bench_cache import ensure_cache
from dinov3_cache.loader.page_cache import describe_residency, volume_files
from dinov3_cache.zarr_arrays import open_array, storage_chunks
from preprocessed_dataloader import PreprocessedDINOv3Dataset


def saved_tensor(cache: Path, volume) -> Path:
    """The volume's features as one float16 tensor file (written once)."""
    path = cache.parent / f"{cache.name}-volume0-features.pt"
    if not path.is_file():
        features = torch.from_numpy(open_array(volume.array_path("features")).read().result())
        torch.save(features, path)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--cache", type=Path, default=None, help="a cache like the 'c256x128' one (default: build it in /tmp)")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--crop", type=int, default=64)
    parser.add_argument("--kind", choices=("c256x128", "c256x128-yx"), default="c256x128",
                        help="which cache to build: default chunks, or chunks spanning y and x (256,16,128,128)")
    parser.add_argument("--num-threads", type=int, default=8)
    args = parser.parse_args()
    cache = ensure_cache(args.kind, 1, args.cache)
    dataset = PreprocessedDINOv3Dataset(cache, volume_indices=[0], crop_size=(args.crop,) * 3, samples_per_volume=args.rounds + 1,
                                        num_threads=args.num_threads, seed=0)
    volume = dataset.volumes[0]
    path = saved_tensor(cache, volume)
    mapped = torch.load(path, mmap=True)

    def baseline(i: int) -> torch.Tensor:
        return mapped[(slice(None), *dataset.sample(i).spatial)].float()

    def loader(i: int):
        return dataset.read_batch([i])

    files = volume_files([volume]) + [path]
    for f in files:  # warm the page cache
        f.read_bytes()
    for i in range(args.rounds + 1):  # every crop's chunks checked once, every code path warm
        loader(i)
    baseline(0)
    assert torch.equal(loader(0).features[0], baseline(0)), "the loader and the baseline disagree"
    print(f"cache {cache}: features {list(volume.features_shape)} {volume.metadata.dtypes['features']}, "
          f"chunks {list(storage_chunks(volume.array_path('features')))}; {args.crop}^3 crops, features float32 delivered")
    print(f"page cache: {describe_residency(files)}; torch threads {torch.get_num_threads()}, loader threads {args.num_threads}, "
          f"rounds {args.rounds}")
    variants = {"torch.load(mmap=True)[crop].float()": baseline, "loader (PreprocessedDINOv3Dataset)": loader}
    wall: dict[str, list[float]] = {k: [] for k in variants}
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    for i in range(1, args.rounds + 1):
        for name, fn in variants.items():
            started, started_cpu = time.perf_counter(), time.process_time()
            fn(i)
            wall[name].append(time.perf_counter() - started)
            cpu[name].append(time.process_time() - started_cpu)
    print(f"\n{'variant':40s} {'min ms':>8s} {'median':>8s} {'crops/s (min)':>14s} {'CPU ms (min)':>13s}")
    for name, times in wall.items():
        print(f"{name:40s} {min(times) * 1e3:8.1f} {statistics.median(times) * 1e3:8.1f} {1 / min(times):14.2f} "
              f"{min(cpu[name]) * 1e3:13.1f}")
    base, ours = wall["torch.load(mmap=True)[crop].float()"], wall["loader (PreprocessedDINOv3Dataset)"]
    print(f"\nloader crops/s / torch.load(mmap) crops/s: {min(base) / min(ours):.2f} (min times), "
          f"{statistics.median(base) / statistics.median(ours):.2f} (medians); target >= 1.0")
    return 0


if __name__ == "__main__":
    sys.exit(main())
