"""The loading benchmark behind `python preprocessed_dataloader.py`: a cold first batch
(page cache evicted), then warm batches, as training sees them."""

from __future__ import annotations

import argparse
import copy
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dinov3_cache.errors import EXIT_OK, OneLineParser, UsageError, report_error
from dinov3_cache.interrupt import EXIT_INTERRUPTED, interrupted_line
from dinov3_cache.loader.arguments import THREADS_PER_CORE, LoaderArgumentError, cache_directory, cpu_count, max_threads
from dinov3_cache.loader.dataloader import PreprocessedDataLoader, create_preprocessed_dataloader
from dinov3_cache.loader.dataset import PreprocessedDINOv3Dataset
from dinov3_cache.loader.reader import READER_CHOICES
from dinov3_cache.loader.volumes import CacheError
from dinov3_cache.storage.dtypes import TORCH_DTYPES

LABEL_ARRAYS = ("gt", "mask", "raw")  # every other stored array holds the features


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def build_parser() -> OneLineParser:
    parser = OneLineParser(
        description="Benchmark loading a preprocessed cache: cold first batch (page cache evicted), then warm batches."
    )
    parser.add_argument("--preprocessed-dir", required=True, help="cache directory (preprocess_volume.py --output-dir)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--num-batches", type=int, default=20, help="batches to time, the first one cold (default 20)")
    parser.add_argument("--num-threads", type=int, default=8, help="read threads (default 8)")
    parser.add_argument("--num-workers", type=int, default=0, help="worker processes (default 0: threads only)")
    parser.add_argument("--volume-indices", type=int, nargs="+", default=None, help="volumes to load (default all)")
    parser.add_argument("--crop-size", type=int, nargs=3, default=None, metavar=("D", "H", "W"), help="random crops")
    parser.add_argument("--samples-per-volume", type=int, default=1)
    parser.add_argument("--features-dtype", default="float32", choices=["stored", "float32", "float16", "bfloat16"],
                        help="dtype handed to training (default float32; 'stored' keeps the file's dtype)")
    parser.add_argument("--reader", default="auto", choices=READER_CHOICES)
    parser.add_argument("--device", default=None, help="e.g. cuda: deliver batches in GPU memory")
    parser.add_argument("--pin-memory", action="store_true")
    parser.add_argument("--shuffle", action="store_true")
    parser.add_argument("--verify-checksums", action=argparse.BooleanOptionalAction, default=True,
                        help="check every chunk read against its recorded crc32, once per file (default; "
                        "--no-verify-checksums reads unchecked)")
    parser.add_argument("--no-evict", action="store_true", help="do not evict the cache files before the first batch")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from dinov3_cache.loader.page_cache import describe_residency, evict_from_page_cache, volume_files

    args = parse_args(argv)
    try:
        check_arguments(args)
    except UsageError as e:
        return report_error(e)
    features_dtype = None if args.features_dtype == "stored" else TORCH_DTYPES[args.features_dtype]
    try:
        loader = create_preprocessed_dataloader(
            args.preprocessed_dir, batch_size=args.batch_size, shuffle=args.shuffle, num_threads=args.num_threads,
            num_workers=args.num_workers, volume_indices=args.volume_indices, crop_size=args.crop_size,
            samples_per_volume=args.samples_per_volume, features_dtype=features_dtype, reader=args.reader,
            device=args.device, pin_memory=args.pin_memory, return_metadata=True,
            verify_checksums=args.verify_checksums,
        )
        files = volume_files(loader.source_dataset.volumes)
        if not args.no_evict:
            evict_from_page_cache(files)
        print(f"Volumes: {len(loader.source_dataset.volumes)}, samples: {len(loader.source_dataset)}, "
              f"batch size {args.batch_size}, reader {args.reader}, threads {args.num_threads}, workers {args.num_workers}, "
              f"checksums {'verified' if args.verify_checksums else 'not verified'}")
        print(f"Page cache before the first batch: {describe_residency(files)}"
              + (" (eviction skipped)" if args.no_evict else " (after posix_fadvise DONTNEED)"))
        report = time_batches(loader, args.num_batches, args.device)
    except CacheError as e:
        return report_error(in_flag_terms(e))
    except KeyboardInterrupt:
        print(interrupted_line("measuring"), file=sys.stderr)
        return EXIT_INTERRUPTED
    print_report(report)
    return EXIT_OK


def check_arguments(args: argparse.Namespace) -> None:
    """Bad values are bad input (status 2), named by their command-line option."""
    if args.batch_size < 1 or args.num_batches < 1 or args.samples_per_volume < 1:
        raise UsageError("--batch-size, --num-batches and --samples-per-volume must be at least 1")
    if not 1 <= args.num_threads <= max_threads():
        raise UsageError(f"--num-threads must be between 1 and {max_threads()} ({THREADS_PER_CORE} per CPU core of this machine), got {args.num_threads}")
    if not 0 <= args.num_workers <= cpu_count():
        raise UsageError(f"--num-workers must be between 0 and {cpu_count()} (the CPU cores of this machine), got {args.num_workers}")
    try:
        cache_directory(args.preprocessed_dir, "--preprocessed-dir")
    except LoaderArgumentError as e:
        raise UsageError(str(e)) from None
    if not Path(args.preprocessed_dir).is_dir():
        raise UsageError(f"--preprocessed-dir {args.preprocessed_dir} is not a directory; pass the --output-dir used for extraction")
    if args.device is None:
        return
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise UsageError(f"--device {args.device!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device} asked for, but no CUDA GPU is visible; leave --device out or use --device cpu")


def in_flag_terms(error: CacheError) -> CacheError:
    """The loader's error as this command's user reads it: its keyword names as the options
    that set them (volume_indices -> --volume-indices)."""
    message = str(error)
    for action in build_parser()._actions:
        if action.option_strings and "_" in action.dest:  # 'volume_indices', never a word such as 'device'
            message = re.sub(rf"(?<![\w/.-]){action.dest}\b", action.option_strings[0], message)
    named = copy.copy(error)
    named.args = (message,)
    return named


@dataclass
class BatchTiming:
    seconds: float
    stored_bytes: int
    delivered_bytes: int
    warm: bool


def time_batches(loader: PreprocessedDataLoader, num_batches: int, device: str | None) -> dict:
    """Time num_batches batches as training sees them (iterator start to batch in hand),
    cycling epochs; a batch is warm when every volume in it was read earlier in this run."""
    dataset = loader.source_dataset
    seen: set[int] = set()
    timings: list[BatchTiming] = []
    shapes = None
    while len(timings) < num_batches:
        iterator = iter(loader)
        started = time.perf_counter()
        for batch in iterator:
            synchronize(device)
            elapsed = time.perf_counter() - started
            indices = [m["volume_index"] for m in batch[3]]
            warm = all(i in seen for i in indices)
            seen.update(indices)
            if shapes is None:
                shapes = [None if t is None else tuple(t.shape) for t in batch[:3]] + [str(batch[0].dtype), str(batch[0].device)]
            timings.append(BatchTiming(elapsed, stored_nbytes(batch, dataset), delivered_nbytes(batch), warm))
            if len(timings) == num_batches:
                iterator.close()
                break
            started = time.perf_counter()
    return {"timings": timings, "shapes": shapes}


def synchronize(device: str | None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def stored_nbytes(batch, dataset: PreprocessedDINOv3Dataset) -> int:
    """Bytes of the batch in the stored dtypes (what was read)."""
    features, gt = batch[0], batch[1]
    volume = dataset.volumes[0]
    dtypes = volume.metadata.dtypes
    # the array holding the features, whatever its storage form (tokens: counted at the features' size)
    stored = next(dtype for array, dtype in dtypes.items() if array not in LABEL_ARRAYS)
    item = np.dtype(stored if stored != "bfloat16" else "u2").itemsize
    label = np.dtype(dtypes["gt"]).itemsize
    mask = 0 if batch[2] is None else batch[2].numel()
    return features.numel() * item + gt.numel() * label + mask


def delivered_nbytes(batch) -> int:
    return sum(t.numel() * t.element_size() for t in batch[:3] if t is not None)


def print_report(report: dict) -> None:
    timings: list[BatchTiming] = report["timings"]
    features_shape, gt_shape, mask_shape, dtype, device = report["shapes"]
    first = timings[0]
    print("First batch (cold load):" if not first.warm else "First batch:")
    print(f"  Features shape: torch.Size({list(features_shape)}) {dtype} on {device}")
    print(f"  GT shape: torch.Size({list(gt_shape)})")
    print(f"  Mask shape: {'None' if mask_shape is None else f'torch.Size({list(mask_shape)})'}")
    print(f"  Load time: {first.seconds * 1e3:.1f}ms ({first.stored_bytes / first.seconds / 1e9:.2f} GB/s read)")
    print()
    for k, t in enumerate(timings[1:], start=2):
        print(f"Batch {k}: {t.seconds * 1e3:.1f}ms ({'warm' if t.warm else 'cold'}, {t.stored_bytes / t.seconds / 1e9:.2f} GB/s)")
    print()
    warm = [t for t in timings[1:] if t.warm]
    cold = [t for t in timings if not t.warm]
    print("Benchmark Results:")
    print(f"Bytes per batch: {first.stored_bytes / 1e9:.3f} GB read (stored dtype), {first.delivered_bytes / 1e9:.3f} GB delivered")
    cold_mean = np.mean([t.seconds for t in cold]) if cold else None
    if cold:
        print(f"Cold load (first batch): {first.seconds * 1e3:.1f}ms" + (
            f"; all {len(cold)} cold batches: mean {cold_mean * 1e3:.1f}ms" if len(cold) > 1 else ""))
    if not warm:
        print("Warm loads (cached): none: every batch read volumes for the first time; raise --num-batches")
        return
    seconds = np.array([t.seconds for t in warm])
    print(f"Warm loads (cached), {len(warm)} batches:")
    print(f"  Mean: {seconds.mean() * 1e3:.1f}ms")
    print(f"  Std: {seconds.std() * 1e3:.1f}ms")
    print(f"  Min: {seconds.min() * 1e3:.1f}ms")
    print(f"  Max: {seconds.max() * 1e3:.1f}ms")
    throughput = sum(t.stored_bytes for t in warm) / seconds.sum() / 1e9
    print(f"  Throughput: {throughput:.2f} GB/s read, {sum(t.delivered_bytes for t in warm) / seconds.sum() / 1e9:.2f} GB/s delivered")
    if cold:
        print(f"\nSpeedup vs cold: {first.seconds / seconds.mean():.1f}x (first batch / warm mean)")


