#!/usr/bin/env python
"""Simulated training over several epochs: fraction of wall time the step waits for data, with
and without prefetch, with the first batch of every epoch counted.

    python -m benchmarks.bench_loader_prefetch [--cache DIR] [--batch-size 2] [--batches-per-epoch 6] [--epochs 3] [--step-factor 1.5]

Reads the C=1024, 64^3 float16 cache (built once by the extraction CLI if --cache has fewer
than 2 volumes), warm, with the API defaults (features float32 on the host); whole volumes,
repeated (samples_per_volume) so that an epoch holds --batches-per-epoch batches. First the
per-batch load time L is measured with prefetch off; then a training step of T = step-factor
x L is simulated with time.sleep (a GPU-bound step leaves the CPU to the loader; on this
2-core machine a busy-looping step would take the CPU the reader needs) in the usual loop
`for epoch: loader.set_epoch(epoch); for batch in loader: step()`. The wait is the time spent
in next(iterator). Modes: prefetch off; prefetch that stops at each epoch boundary (each pass
closed before it ends, as the loader did before prefetching crossed epochs); prefetch across
epoch boundaries (the loader's default). Target: <= 2 % waiting once the run's first batch is in.
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

MODES = {  # name: (prefetch_batches, prefetch continues across epochs)
    "no prefetch": (0, False),
    "prefetch 2, per epoch": (2, False),
    "prefetch 2, across epochs": (2, True),
}


def train(cache: Path, batch_size: int, per_epoch: int, epochs: int, step_seconds: float, prefetch: int,
          across_epochs: bool, num_threads: int) -> dict:
    """waits[e][b]: seconds the step waited for batch b of epoch e."""
    loader = create_preprocessed_dataloader(cache, batch_size=batch_size, shuffle=True, num_threads=num_threads,
                                            prefetch_batches=prefetch, samples_per_volume=per_epoch)
    waits: list[list[float]] = []
    started = time.perf_counter()
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        epoch_pass = iter(loader)
        waits.append([])
        for _ in range(len(epoch_pass)):
            t = time.perf_counter()
            batch = next(epoch_pass)
            waits[-1].append(time.perf_counter() - t)
            del batch
            time.sleep(step_seconds)  # the training step
        if not across_epochs:
            epoch_pass.close()  # before its end: its stream stops instead of reading the next epoch
        else:
            assert next(epoch_pass, None) is None
    wall = time.perf_counter() - started
    return {"wall": wall, "waits": waits}


def waiting_fractions(run: dict, step: float) -> tuple[float, float, float]:
    """Waiting as % of wall time: everything; after the run's first batch (epoch boundaries
    counted); after each epoch's first batch (waits inside epochs only)."""
    waits, wall = run["waits"], run["wall"]
    total = sum(map(sum, waits))
    first = waits[0][0]
    after_first = (total - first) / (wall - first - step)
    epoch_firsts = sum(w[0] for w in waits)
    within = (total - epoch_firsts) / (wall - epoch_firsts - len(waits) * step)
    return 100 * total / wall, 100 * after_first, 100 * within


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--cache", type=Path, default=None, help="a cache like the 'c1024' one (default: build it in /tmp)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--batches-per-epoch", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--step-factor", type=float, default=1.5, help="T = factor x measured load time (default 1.5)")
    parser.add_argument("--num-threads", type=int, default=8)
    args = parser.parse_args()
    cache = ensure_cache("c1024", 2, args.cache)
    shape = (args.batch_size, args.batches_per_epoch, args.epochs)
    train(cache, args.batch_size, 2, 1, 0.0, 0, False, args.num_threads)  # warm the page cache
    load = train(cache, *shape, 0.0, 0, False, args.num_threads)
    per_batch = statistics.median(w for epoch in load["waits"] for w in epoch)
    step = args.step_factor * per_batch
    print(f"cache {cache}, batch size {args.batch_size}, {args.epochs} epochs of {args.batches_per_epoch} batches, "
          f"features float32 on the host; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print(f"load time per batch (no prefetch, no step): median {per_batch * 1e3:.0f} ms; simulated step T = {step * 1e3:.0f} ms")
    print(f"\n{'mode':>26s} {'wall s':>7s} {'waiting %':>10s} {'% after batch 1':>16s} {'% within epochs':>16s} "
          f"{'ratio':>6s} {'epoch-start waits ms':>22s}")
    for name, (prefetch, across) in MODES.items():
        run = train(cache, *shape, step, prefetch, across, args.num_threads)
        everything, after_first, within = waiting_fractions(run, step)
        starts = " ".join(f"{epoch[0] * 1e3:.0f}" for epoch in run["waits"])
        ratio = after_first / within if within > 0 else float("inf")
        print(f"{name:>26s} {run['wall']:7.2f} {everything:10.1f} {after_first:16.1f} {within:16.1f} {ratio:6.1f} {starts:>22s}")
    print("\nwaiting % = time in next() / wall time; '% after batch 1' leaves out only the run's first batch (epoch "
          "boundaries counted); '% within epochs' leaves out every epoch's first batch; ratio = the two. "
          "Target <= 2 % after batch 1 with prefetch across epochs.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
