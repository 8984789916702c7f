#!/usr/bin/env python
"""Simulated training: fraction of wall time the step waits for data, with and without prefetch.

    python -m benchmarks.bench_loader_prefetch [--cache DIR] [--batch-size 2] [--batches 12] [--step-factor 1.5]

Reads the C=1024, 64^3 float16 cache (built once by the extraction CLI if --cache has fewer
than 2 volumes), warm, with the API defaults (features float32 on the host); whole volumes,
repeated so that one epoch holds every timed batch (the prefetch thread works within an
epoch: the first batch of each epoch is read while the loop waits). First the
per-batch load time L is measured with prefetch off; then a training step of T = step-factor
x L is simulated with time.sleep (a GPU-bound step leaves the CPU to the loader; on this
2-core machine a busy-looping step would take the CPU the reader needs). The wait is the
time spent in next(iterator). Target from the issue: <= 5 % waiting when T > L.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path


from benchmarks.loader_bench_cache import ensure_cache
from preprocessed_dataloader import create_preprocessed_dataloader


def train(cache: Path, batch_size: int, batches: int, step_seconds: float, prefetch: int, num_threads: int) -> dict:
    # one epoch holds every timed batch (volumes repeat): prefetching does not cross epochs
    loader = create_preprocessed_dataloader(cache, batch_size=batch_size, shuffle=True, num_threads=num_threads,
                                            prefetch_batches=prefetch, samples_per_volume=batches)
    waits: list[float] = []
    started = time.perf_counter()
    while len(waits) < batches:
        iterator = iter(loader)
        while len(waits) < batches:
            t = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                break
            waits.append(time.perf_counter() - t)
            del batch
            time.sleep(step_seconds)  # the training step
        iterator.close()
    wall = time.perf_counter() - started
    return {"wall": wall, "waits": waits}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--cache", type=Path, default=None, help="a cache like the 'c1024' one (default: build it in /tmp)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--step-factor", type=float, default=1.5, help="T = factor x measured load time (default 1.5)")
    parser.add_argument("--num-threads", type=int, default=8)
    args = parser.parse_args()
    cache = ensure_cache("c1024", 2, args.cache)
    train(cache, args.batch_size, 2, 0.0, 0, args.num_threads)  # warm the page cache
    load = train(cache, args.batch_size, args.batches, 0.0, 0, args.num_threads)
    per_batch = statistics.median(load["waits"])
    step = args.step_factor * per_batch
    print(f"cache {cache}, batch size {args.batch_size}, {args.batches} batches, features float32 on the host; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print(f"load time per batch (no prefetch, no step): median {per_batch * 1e3:.0f} ms; simulated step T = {step * 1e3:.0f} ms")
    print(f"\n{'prefetch_batches':>16s} {'wall s':>8s} {'waiting s':>10s} {'waiting %':>10s} {'% after batch 1':>16s}")
    for prefetch in (0, 1, 2):
        run = train(cache, args.batch_size, args.batches, step, prefetch, args.num_threads)
        waiting = sum(run["waits"])
        later = sum(run["waits"][1:])
        print(f"{prefetch:16d} {run['wall']:8.2f} {waiting:10.2f} {100 * waiting / run['wall']:10.1f} "
              f"{100 * later / (run['wall'] - run['waits'][0] - step):16.1f}")
    print("\nwaiting % = time in next() / wall time; '% after batch 1' leaves out the first batch, which nothing can hide. "
          "target <= 5 % with prefetch")
    return 0


if __name__ == "__main__":
    sys.exit(main())
