#!/usr/bin/env python
"""K volumes in one process against K single-volume processes, in the same run, on this machine.

    python -m benchmarks.bench_volumes_per_process [--volumes 4] [--model-id random:small] [--output-image-dim 32]

Both sides run preprocess_volume.py as a job does (a fresh interpreter, the imports, the model
load, synthetic crops, commits to a temporary cache): once with `--volume-index 0-(K-1)`,
and K times with one index each. Printed: wall seconds per volume of each side and their ratio
(single / packed: how many times more volumes per hour a packed job gets).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(output_dir: Path, indices: str, args: argparse.Namespace) -> float:
    command = [
        sys.executable, str(REPO / "preprocess_volume.py"), "--volume-index", *indices.split(), "--output-dir", str(output_dir),
        "--source", "synthetic", "--model-id", args.model_id, "--output-image-dim", str(args.output_image_dim),
        "--device", "cpu",
    ]
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, cwd=REPO)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--volumes", type=int, default=4, help="K (default %(default)s)")
    parser.add_argument("--model-id", default="random:small")
    parser.add_argument("--output-image-dim", type=int, default=32)
    args = parser.parse_args(argv)
    k = args.volumes
    with tempfile.TemporaryDirectory() as tmp:
        single = sum(run(Path(tmp) / "single", str(i), args) for i in range(k))
        packed = run(Path(tmp) / "packed", f"0-{k - 1}", args)
    print(f"{k} volumes, {args.model_id}, output {args.output_image_dim}^3 (slices "
          f"{args.output_image_dim * 4}^2), CPU")
    print(f"  {k} single-volume processes: {single / k:.2f} s per volume")
    print(f"  one process of {k} volumes:   {packed / k:.2f} s per volume")
    print(f"  ratio single / packed: {single / packed:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
