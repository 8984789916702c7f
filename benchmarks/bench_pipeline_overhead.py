#!/usr/bin/env python
"""Pipeline overhead: a whole volume (model load excluded) against the bare model forward.

    python -m benchmarks.bench_pipeline_overhead [--model-id random:small] [--output-image-dim 64] [--repeats 3]

Both sides run here, alternately, on the same slices: the bare side is only
`model(pixel_values=...)` over every slice of every plane in the pipeline's batches;
the pipeline side is preprocess_volume() end to end (slicing, normalisation, forward,
upsampling, plane averaging, checksums, TensorStore writes awaited, commit) with the
crop handed over ready-made, so the source's own cost is not counted. Target: <= 1.15.
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
from dinov3_cache.extraction.features import normalise, plane_slices
from dinov3_cache.extraction.model import load_model
from dinov3_cache.extraction.pipeline import preprocess_volume
from dinov3_cache.extraction.settings import ExtractionSettings
from dinov3_cache.sources.base import CropGeometry, SamplingOptions
from dinov3_cache.sources.synthetic import SyntheticSource


def bare_forward_seconds(loaded, pixel_batches) -> float:
    started = time.perf_counter()
    with torch.inference_mode():
        for pixels in pixel_batches:
            loaded.model(pixel_values=pixels)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-id", default="random:small")
    parser.add_argument("--output-image-dim", type=int, default=64, help="64 gives 256 x 256 slices")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    loaded = load_model(args.model_id, device="cpu")
    geometry = CropGeometry(output_image_dim=args.output_image_dim)
    crop = SyntheticSource().sample(0, geometry, SamplingOptions())
    d = geometry.output_image_dim
    pixel_batches = [
        normalise(plane_slices(crop.raw, plane, d, start, min(d, start + args.batch_size), loaded.device),
                  crop.raw_range, loaded.normalization)
        for plane in ("xy", "xz", "yz")
        for start in range(0, d, args.batch_size)
    ]
    n_slices = sum(len(p) for p in pixel_batches)
    print(f"model {args.model_id} (C={loaded.hidden_size}), {n_slices} slices of {geometry.slice_size}^2, "
          f"features {loaded.hidden_size} x {d}^3, torch threads {torch.get_num_threads()}")

    bare, pipeline = [], []
    for repeat in range(args.repeats):
        bare.append(bare_forward_seconds(loaded, pixel_batches))
        out = Path(tempfile.mkdtemp(prefix="bench_overhead_"))
        try:
            config = ExtractionSettings(output_dir=str(out), model_id=args.model_id, batch_size=args.batch_size, device="cpu",
                                        output_image_dim=geometry.output_image_dim).config(repeat)
            started = time.perf_counter()
            outcome = preprocess_volume(config, FixedSource(crop), loaded)
            pipeline.append(time.perf_counter() - started)
        finally:
            shutil.rmtree(out)
        print(f"  run {repeat}: bare forward {bare[-1]:.2f} s, whole volume {pipeline[-1]:.2f} s, "
              f"ratio {pipeline[-1] / bare[-1]:.3f}")
    ratio = statistics.median(p / b for p, b in zip(pipeline, bare))
    print(f"last volume's timing: {outcome.metadata.timing}")
    print(f"pipeline / bare forward (median of {args.repeats}): {ratio:.3f}  (target <= 1.15)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
