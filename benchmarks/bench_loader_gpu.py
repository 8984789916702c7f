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
--smoke runs the same steps on the CPU over a tiny 1-volume cache (host clock, pageable memory),
so a broken script shows without a GPU; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.bench_gpu_extraction import device_name, device_time, synchronize
from benchmarks.loader_bench_cache import ensure_cache
from preprocessed_dataloader import create_preprocessed_dataloader


def copy_rate(nbytes: int, pinned: bool, device: torch.device, repeats: int = 5) -> float:
    """GB/s of one host-to-device copy of nbytes, best of repeats (pinned memory needs CUDA)."""
    host = torch.empty(nbytes // 2, dtype=torch.float16, pin_memory=pinned and device.type == "cuda")
    host.fill_(1)
    target = torch.empty_like(host, device=device)
    best = device_time(lambda: target.copy_(host, non_blocking=pinned), repeats, warmup=0, device=device, summary=min)
    return nbytes / best / 1e9


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--cache", type=Path, default=None, help="a cache like the 'c1024' one (default: build it in /tmp)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--num-threads", type=int, default=8)
    parser.add_argument("--smoke", action="store_true", help="on the CPU over a tiny cache: checks the script, measures nothing")
    args = parser.parse_args()
    if args.smoke:
        with tempfile.TemporaryDirectory() as tmp:
            measure(args, ensure_cache("tiny", 1, root=Path(tmp), device="cpu"), torch.device("cpu"))
        return 0
    if not torch.cuda.is_available():
        print("No CUDA GPU on this machine: nothing measured. Run this script on a machine with a GPU.")
        return 0
    measure(args, ensure_cache("c1024", 2, args.cache, device="cuda"), torch.device("cuda"))
    return 0


def measure(args: argparse.Namespace, cache: Path, device: torch.device) -> None:
    loader = create_preprocessed_dataloader(
        cache, batch_size=args.batch_size, shuffle=True, num_threads=args.num_threads, device=device,
        samples_per_volume=max(1, args.batches * args.batch_size // 2),  # one epoch covers the timed batches
    )
    features_shape = loader.source_dataset.volumes[0].features_shape
    batch_bytes = args.batch_size * 2 * int(torch.tensor(features_shape).prod())
    pinned, pageable = copy_rate(batch_bytes, True, device), copy_rate(batch_bytes, False, device)

    for _ in loader:  # warm-up epoch: page cache, pinned-memory pool, CUDA context
        pass
    synchronize(device)
    count, started = 0, time.perf_counter()
    for features, _gt, _mask in loader:  # noqa: B007 - the last batch is described below
        synchronize(device)  # the batch is really there
        count += 1
        if count == args.batches:
            break
    elapsed = time.perf_counter() - started
    rate = count * batch_bytes / elapsed / 1e9
    print(f"{device_name(device)}; {os.cpu_count()} CPUs; cache {cache}")
    print(f"batch: {args.batch_size} x {list(features_shape)} float16 = {batch_bytes / 1e9:.3f} GB (+ gt, mask); "
          f"delivered as {features.dtype} on {features.device}")
    print(f"host-to-device copy: pinned {pinned:.2f} GB/s, pageable {pageable:.2f} GB/s")
    print(f"loader (device='{device}'): {count / elapsed:.2f} batches/s, {rate:.2f} GB/s of float16 features")
    print(f"ratio loader / pinned copy: {rate / pinned:.2f}; loader / pageable copy: {rate / pageable:.2f}")


if __name__ == "__main__":
    sys.exit(main())
