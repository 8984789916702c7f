#!/usr/bin/env python
"""Peak memory of one seed-sized volume: C = 1024 features over 128^3 from 512 x 512 slices.

    python -m benchmarks.bench_peak_memory [--batch-size 8] [--model-id random:vitl16-1layer] [--output-image-dim 128]

Runs preprocess_volume.py in a fresh process (synthetic source, a one-layer 1024-wide
random model so that it finishes on a CPU) and reports the process's peak resident
memory against the size of the features it writes (4.3 GB in float16). Target: <= 3 GB.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.bench_common import peak_rss_gb_of_children
from dinov3_cache.paths import VolumePaths
from dinov3_cache.schema import load_volume_metadata

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-id", default="random:vitl16-1layer")
    parser.add_argument("--output-image-dim", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8, help="slices per forward (the forward's activations scale with it)")
    parser.add_argument("--dir", default=None, help="where to write the volume (default: the system temp dir)")
    args = parser.parse_args()
    out = Path(tempfile.mkdtemp(prefix="bench_memory_", dir=args.dir))
    command = [sys.executable, str(REPO / "preprocess_volume.py"), "--volume-index", "0", "--output-dir", str(out),
               "--source", "synthetic", "--model-id", args.model_id, "--output-image-dim", str(args.output_image_dim),
               "--batch-size", str(args.batch_size), "--device", "cpu"]
    try:
        started = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - started
        peak = peak_rss_gb_of_children()
        meta = load_volume_metadata(VolumePaths(out, 0).metadata).to_dict()
    finally:
        shutil.rmtree(out)
    c, d = meta["shapes"]["features"][0], meta["shapes"]["features"][1]
    features_gb = meta["storage"]["features_gb"]
    print(f"features {c} x {d}^3 {meta['dtypes']['features']} from {meta['configuration']['slice_size']}^2 slices: "
          f"{features_gb:.2f} GB on disk; float32 volume would be {c * d**3 * 4 / 1e9:.2f} GB")
    print(f"batch size {args.batch_size}; wall {wall:.0f} s (timing: {meta['timing']})")
    print(f"peak RSS {peak:.2f} GB = {peak / features_gb:.2f} x the features written  (target <= 3 GB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
