"""What verify_checksums costs: a warm whole-volume read (features, gt, mask) of the
"c1024" benchmark cache (537 MB of features) through the dataset, with and without the
crc32 check of every chunk, in interleaved rounds (so drift hits both alike).

    python -m benchmarks.bench_loader_checksums [--rounds 5] [--num-threads 8]

Prints the median seconds of each and the ratio checked / unchecked."""

from __future__ import annotations

import argparse
import statistics
import time

from benchmarks.loader_bench_cache import ensure_cache
from preprocessed_dataloader import PreprocessedDINOv3Dataset


def read_once(cache, verify: bool, num_threads: int) -> float:
    dataset = PreprocessedDINOv3Dataset(cache, volume_indices=[0], verify_checksums=verify, num_threads=num_threads)
    started = time.perf_counter()
    sample = dataset[0]
    elapsed = time.perf_counter() - started
    assert sample is not None
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--num-threads", type=int, default=8)
    args = parser.parse_args()
    cache = ensure_cache("c1024", 1)
    read_once(cache, False, args.num_threads)  # warm the page cache
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.rounds):
        for verify in (False, True):
            times[verify].append(read_once(cache, verify, args.num_threads))
    plain, checked = statistics.median(times[False]), statistics.median(times[True])
    print(f"warm whole-volume read, c1024 (537 MB features), {args.rounds} interleaved rounds, {args.num_threads} threads")
    print(f"  verify_checksums=False  {plain:.3f} s (median)")
    print(f"  verify_checksums=True   {checked:.3f} s (median)")
    print(f"  ratio checked / unchecked: {checked / plain:.2f}x")


if __name__ == "__main__":
    main()
