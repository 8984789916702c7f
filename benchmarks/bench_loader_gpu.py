#!/usr/bin/env python
"""GPU delivery: batches in GPU memory per second against the host-to-device copy rate, one run.

    python -m benchmarks.bench_loader_gpu [--cache DIR] [--batch-size 2] [--batches 10]

On a machine without CUDA it says so and measures nothing. Otherwise it builds (on the GPU,
seconds) or reuses a C=1024, 64^3 float16 cache of 2 volumes, then measures in one run:
  - the host-to-device copy rate of one batch of features in float16, from pinned and from
    pageable memory (torch copies timed with CUDA events, 5 repeats, best);
  - the loader with device="cuda" (stored float16 read into pinned memory, copied on a side
    stream, converted to float32 on the GPU), warm page cache, after one warm-up epoch:
    batches per second and the float16 bytes moved per second.
Ratio: loader GB/s / pinned copy GB/s (1.0 = the loader delivers as fast as the bus can take it).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch


def copy_rate(nbytes: int, pinned: bool, repeats: int = 5) -> float:
    host = torch.empty(nbytes // 2, dtype=torch.float16, pin_memory=pinned)
    host.fill_(1)
    device = torch.empty_like(host, device="cuda")
    best = float("inf")
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        device.copy_(host, non_blocking=pinned)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return nbytes / best / 1e9


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--cache", type=Path, default=None, help="a cache like the 'c1024' one (default: build it in /tmp)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--num-threads", type=int, default=8)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("No CUDA GPU on this machine: nothing measured. Run this script on a machine with a GPU.")
        return 0

    from loader_bench_cache import ensure_cache

    from preprocessed_dataloader import create_preprocessed_dataloader

    cache = ensure_cache("c1024", 2, args.cache, device="cuda")
    loader = create_preprocessed_dataloader(
        cache, batch_size=args.batch_size, shuffle=True, num_threads=args.num_threads, device="cuda",
        samples_per_volume=max(1, args.batches * args.batch_size // 2),  # one epoch covers the timed batches
    )
    features_shape = loader.source_dataset.volumes[0].features_shape
    batch_bytes = args.batch_size * 2 * int(torch.tensor(features_shape).prod())
    pinned, pageable = copy_rate(batch_bytes, True), copy_rate(batch_bytes, False)

    for _ in loader:  # warm-up epoch: page cache, pinned-memory pool, CUDA context
        pass
    torch.cuda.synchronize()
    count, started = 0, time.perf_counter()
    for features, _gt, _mask in loader:  # noqa: B007 - the last batch is described below
        torch.cuda.current_stream().synchronize()  # the batch is really there
        count += 1
        if count == args.batches:
            break
    elapsed = time.perf_counter() - started
    rate = count * batch_bytes / elapsed / 1e9
    print(f"{torch.cuda.get_device_name()}; {os.cpu_count()} CPUs; cache {cache}")
    print(f"batch: {args.batch_size} x {list(features_shape)} float16 = {batch_bytes / 1e9:.3f} GB (+ gt, mask); "
          f"delivered as {features.dtype} on {features.device}")
    print(f"host-to-device copy: pinned {pinned:.2f} GB/s, pageable {pageable:.2f} GB/s")
    print(f"loader (device='cuda'): {count / elapsed:.2f} batches/s, {rate:.2f} GB/s of float16 features")
    print(f"ratio loader / pinned copy: {rate / pinned:.2f}; loader / pageable copy: {rate / pageable:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
