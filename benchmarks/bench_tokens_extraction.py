#!/usr/bin/env python
"""Storage, extraction wall and peak memory per volume: dense layout / tokens layout, same run.

    python -m benchmarks.bench_tokens_extraction [--model-id random:vitl16-1layer] [--output-image-dim 128]

The seed geometry by default: C = 1024 (the one-layer 1024-wide random model keeps the
forward short on a CPU), 128^3 label voxels from 512 x 512 slices, float16, uncompressed.
Volume 0 of the synthetic source is extracted twice by preprocess_volume.py, each in its
own process (--layout dense, then --layout tokens); each process's peak resident memory
comes from wait4. Storage is what du counts for the volume's files. Target: dense / tokens
storage >= 5.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dinov3_cache.disk import bytes_on_disk
from dinov3_cache.paths import VolumePaths
from dinov3_cache.schema import load_volume_metadata

REPO = Path(__file__).resolve().parents[1]


def extract(out: Path, layout: str, args) -> dict:
    """Run one extraction; its wall, peak RSS and the volume's bytes (the volume is removed after)."""
    command = [sys.executable, str(REPO / "preprocess_volume.py"), "--volume-index", "0", "--output-dir", str(out),
               "--source", "synthetic", "--model-id", args.model_id, "--output-image-dim", str(args.output_image_dim),
               "--batch-size", str(args.batch_size), "--device", "cpu", "--layout", layout]
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    if status != 0:
        raise SystemExit(f"error: extraction with --layout {layout} failed (status {status})")
    paths = VolumePaths(out, 0)
    metadata = load_volume_metadata(paths.metadata)
    stored = "tokens" if layout == "tokens" else "features"
    result = {
        "wall": wall, "peak_gb": usage.ru_maxrss * 1024 / 1e9, "timing": metadata.timing,
        "feature_bytes": bytes_on_disk(paths.array(stored)),
        "volume_bytes": sum(bytes_on_disk(p) for p in paths.existing_arrays()),
        "shape": metadata.shapes[stored],
    }
    shutil.rmtree(out)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-id", default="random:vitl16-1layer")
    parser.add_argument("--output-image-dim", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dir", default=None, help="where to write the volumes (default: the system temp dir)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench_tokens_", dir=args.dir))
    try:
        results = {layout: extract(root / layout, layout, args) for layout in ("dense", "tokens")}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    dense, tokens = results["dense"], results["tokens"]
    print(f"dense features {dense['shape']} vs tokens {tokens['shape']} (float16, uncompressed)")
    print(f"{'':<28}{'dense':>12}{'tokens':>12}{'dense/tokens':>14}")
    rows = [
        ("feature array GB", "feature_bytes", 1e9), ("volume GB (with gt, mask)", "volume_bytes", 1e9),
        ("extraction wall s", "wall", 1), ("peak RSS GB", "peak_gb", 1),
    ]
    for label, key, scale in rows:
        print(f"{label:<28}{dense[key] / scale:>12.3f}{tokens[key] / scale:>12.3f}{dense[key] / tokens[key]:>14.2f}")
    for layout, r in results.items():
        print(f"{layout} timing: {r['timing']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
