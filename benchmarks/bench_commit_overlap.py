#!/usr/bin/env python
"""Each volume's last writes and commit overlapping the next volume's extraction, against
finishing each volume before the next starts, in one process and the same run.

    python -m benchmarks.bench_commit_overlap [--volumes 4] [--rounds 3] [--model-id random:tiny] [--output-image-dim 32] [--layout dense]

Both sides call preprocess_volumes (what preprocess_volume.py --volume-index 0-(K-1) runs)
with one model loaded beforehand and one ready-made crop, so neither the model load nor the
source is counted; they alternate, round by round, into fresh temporary caches. Printed: wall
seconds per volume of each side (median over rounds) and their ratio (serial / overlapped),
with the last serial round's per-volume split between extraction and the wait for the writes.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.bench_common import FixedSource
from dinov3_cache.extraction.model import load_model
from dinov3_cache.extraction.multi import preprocess_volumes
from dinov3_cache.extraction.settings import ExtractionSettings
from dinov3_cache.sources.base import CropGeometry, SamplingOptions
from dinov3_cache.sources.synthetic import SyntheticSource


def run_side(args: argparse.Namespace, source: FixedSource, loaded, overlap: bool) -> tuple[float, list]:
    """Seconds for K volumes, and their results."""
    out = Path(tempfile.mkdtemp(prefix="bench_commit_overlap_"))
    try:
        settings = ExtractionSettings(output_dir=str(out), model_id=args.model_id, device=args.device, layout=args.layout,
                                      output_image_dim=args.output_image_dim)
        configs = [settings.config(i) for i in range(args.volumes)]
        started = time.perf_counter()
        results = preprocess_volumes(configs, source, overlap_commits=overlap, loaded=loaded)
        seconds = time.perf_counter() - started
    finally:
        shutil.rmtree(out)
    assert all(r.state == "complete" for r in results), [r.message for r in results]
    return seconds, results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--volumes", type=int, default=4, help="K volumes per side and round (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model-id", default="random:tiny")
    parser.add_argument("--output-image-dim", type=int, default=32)
    parser.add_argument("--layout", choices=("dense", "tokens"), default="dense")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    loaded = load_model(args.model_id, device=args.device)
    geometry = CropGeometry(output_image_dim=args.output_image_dim)
    source = FixedSource(SyntheticSource().sample(0, geometry, SamplingOptions()))
    print(f"{args.volumes} volumes per side, {args.model_id} (C={loaded.hidden_size}), {args.layout} layout, output "
          f"{args.output_image_dim}^3 (slices {geometry.slice_size}^2), {args.device}, torch threads {torch.get_num_threads()}")
    run_side(args, source, loaded, overlap=True)  # warm-up: allocator, page cache, thread pools
    serial, overlapped = [], []
    for round_ in range(args.rounds):
        seconds, results = run_side(args, source, loaded, overlap=False)
        serial.append(seconds / args.volumes)
        overlapped.append(run_side(args, source, loaded, overlap=True)[0] / args.volumes)
        print(f"  round {round_}: serial {serial[-1]:.3f} s per volume, overlapped {overlapped[-1]:.3f} s per volume")
    timing = [r.outcome.metadata.timing for r in results]
    extraction = statistics.mean(t["feature_extraction_seconds"] for t in timing)
    waits = statistics.mean(t["tensorstore_write_seconds"] for t in timing)
    print(f"serial, per volume: extraction {extraction:.3f} s, waiting for writes {waits:.3f} s")
    s, o = statistics.median(serial), statistics.median(overlapped)
    print(f"per volume (median of {args.rounds}): serial {s:.3f} s, overlapped {o:.3f} s; ratio serial / overlapped {s / o:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
