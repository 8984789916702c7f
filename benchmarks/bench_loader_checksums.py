"""What the loader's default verification costs against an unverified read: warm reads of the
"c256x128" benchmark cache (C=256, 128^3, float16, default chunks) through the dataset, stored
dense and as tokens, whole volumes and random crops, in interleaved rounds in one process (so
drift hits every reading alike). Features are delivered as float32, what training gets.

Three readings per case:
  unverified     verify_checksums=False
  default, 1st   the default, with this process's record of checked chunk files emptied
                 first: every chunk read is checked (the first epoch)
  default        the default again: the files were checked already (every later epoch)

Each as wall seconds and as the process's CPU seconds (all threads; steadier than wall time
on a shared machine), medians, with their ratios to the unverified reading. Then the
verifier's rate: crc32 of the stored chunk bytes, one thread, from memory.

    python -m benchmarks.bench_loader_checksums [--rounds 5] [--num-threads 8] [--crops 8] [--crop 64] [--layouts dense tokens]

--smoke runs the same steps over a tiny cache in a temporary directory; its figures mean nothing."""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import zlib
from pathlib import Path

from benchmarks.bench_tokens_loader import tokens_cache
from benchmarks.loader_bench_cache import DEFAULT_ROOT, ensure_cache
from dinov3_cache.disk import iter_files
from dinov3_cache.loader.identity import VERIFIED_CHUNKS
from dinov3_cache.paths import VolumePaths
from dinov3_cache.schema import load_volume_metadata
from preprocessed_dataloader import PreprocessedDINOv3Dataset

READINGS = ("unverified", "default, 1st", "default")


def read_pass(cache: Path, reading: str, threads: int, crop: int | None, crops: int) -> tuple[float, float]:
    """Wall and CPU seconds to deliver volume 0 whole, or `crops` random crops of it (the same ones every pass)."""
    if reading == "default, 1st":
        VERIFIED_CHUNKS.hashes.clear()
    dataset = PreprocessedDINOv3Dataset(
        cache, volume_indices=[0], num_threads=threads, crop_size=(crop,) * 3 if crop else None,
        samples_per_volume=crops if crop else 1, verify_checksums=reading != "unverified",
    )
    started, cpu = time.perf_counter(), time.process_time()
    for index in range(len(dataset)):
        dataset[index]
    elapsed = time.perf_counter() - started, time.process_time() - cpu
    dataset.resources.close()
    return elapsed


def verifier_rate(cache: Path) -> tuple[float, int]:
    """crc32 bytes per second over the volume's stored feature chunks, one thread, from memory."""
    paths = VolumePaths(cache, 0)
    array = paths.array(load_volume_metadata(paths.metadata).storage_form.array_name)
    chunks = [Path(entry.path).read_bytes() for entry in iter_files(array) if not entry.name.startswith((".z", "zarr.json"))]
    started = time.perf_counter()
    for data in chunks:
        zlib.crc32(data)
    nbytes = sum(map(len, chunks))
    return nbytes / (time.perf_counter() - started), nbytes


def compare(caches: dict[str, Path], args: argparse.Namespace, crop: int) -> None:
    cases = [(layout, c) for layout in caches for c in (None, crop)]
    times = {(case, reading): [] for case in cases for reading in READINGS}
    for case in cases:  # warm the page cache and this process's record
        read_pass(caches[case[0]], "default", args.num_threads, case[1], args.crops)
    for _ in range(args.rounds):
        for case in cases:
            for reading in READINGS:
                times[case, reading].append(read_pass(caches[case[0]], reading, args.num_threads, case[1], args.crops))
    print(f"warm reads, median of {args.rounds} interleaved rounds, {args.num_threads} threads, float32 delivered; "
          f"ratio against unverified")
    for measure, which in (("wall", 0), ("CPU", 1)):
        print(f"{measure + ' seconds':<26}" + "".join(f"{r:>22}" for r in READINGS))
        for layout, c in cases:
            label = f"{layout}, " + (f"{args.crops} crops of {c}^3" if c else "whole volume")
            cells = [statistics.median(t[which] for t in times[(layout, c), r]) for r in READINGS]
            print(f"{label:<26}" + "".join(f"{s:>12.3f} s {s / cells[0]:>6.2f}x" for s in cells))
    for layout, cache in caches.items():
        rate, nbytes = verifier_rate(cache)
        print(f"verifier (zlib crc32, one thread) over {layout} chunks ({nbytes / 1e6:.0f} MB): {rate / 1e9:.2f} GB/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--num-threads", type=int, default=8)
    parser.add_argument("--crops", type=int, default=8, help="random crops per pass (default 8)")
    parser.add_argument("--crop", type=int, default=64, help="crop edge (default 64)")
    parser.add_argument("--layouts", nargs="+", choices=["dense", "tokens"], default=["dense", "tokens"])
    parser.add_argument("--smoke", action="store_true", help="a tiny cache in a temporary directory; figures mean nothing")
    args = parser.parse_args()
    if args.smoke:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            caches = {"dense": ensure_cache("tiny", 1, root=root, device="cpu"), "tokens": tokens_cache("tiny", 1, root)}
            compare(caches, argparse.Namespace(**{**vars(args), "rounds": 1}), 8)
        return
    built = {"dense": lambda: ensure_cache("c256x128", 1, root=DEFAULT_ROOT), "tokens": lambda: tokens_cache("c256x128", 1, DEFAULT_ROOT)}
    compare({layout: built[layout]() for layout in args.layouts}, args, args.crop)


if __name__ == "__main__":
    main()
