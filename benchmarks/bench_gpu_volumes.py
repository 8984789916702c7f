#!/usr/bin/env python
"""Volumes per GPU-hour, in one command on one GPU (< 8 minutes):

    python -m benchmarks.bench_gpu_volumes [--layouts dense tokens] [--volumes-per-job 8] [--batch-size 32]

1. the card's bf16 matmul rate (8192^3): the baseline;
2. ViT-L/16 at 512^2 in bf16, batch --batch-size: slices/s and fraction of the matmul rate,
   eager (the transformers model as loaded) vs with the RoPE tables cached vs compiled;
3. compilation time in a fresh process with an empty cache (cold), then in another with the
   same cache (warm);
4. per layout: one preprocess_volume.py process of K volumes at seed geometry (random ViT-L/16,
   synthetic crops, --compile with the warm cache), wall to volumes per GPU-hour, against the
   plain disk-write rate of the same temporary directory (bytes of one volume / write rate).
A layout the installed preprocess_volume.py does not know is reported and skipped.
On a machine without CUDA it says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.bench_gpu_extraction import cuda_time, gpu_baseline, vit_flops_per_slice

REPO = Path(__file__).resolve().parents[1]

COMPILE_PROBE = """
import json, sys, time, torch
from dinov3_cache.extraction.model import ExecutionOptions, compile_cache_counts, load_model
loaded = load_model("random:vitl16", device="cuda", execution=ExecutionOptions(compile=True, compile_cache=sys.argv[1]))
x = torch.randn(int(sys.argv[2]), 3, 512, 512, device="cuda", dtype=torch.bfloat16)
started = time.perf_counter()
with torch.inference_mode():
    loaded.model(pixel_values=x)
torch.cuda.synchronize()
print(json.dumps({"seconds": time.perf_counter() - started, **compile_cache_counts()}))
"""


def forward_rates(batch: int, flops: float, peak: float) -> None:
    from dinov3_cache.extraction.model import build_random_model, cache_rope_tables, compiled, feature_difference, features_match

    model, _ = build_random_model("random:vitl16")
    model = model.cuda().to(torch.bfloat16).eval()
    x = torch.randn(batch, 3, 512, 512, device="cuda", dtype=torch.bfloat16)

    with torch.inference_mode():
        reference = model(pixel_values=x).last_hidden_state

    def rate_of(name: str, m: torch.nn.Module) -> None:
        @torch.inference_mode()
        def step():
            return m(pixel_values=x)

        rate = batch / cuda_time(step, repeats=5, warmup=2)
        hidden = step().last_hidden_state
        difference = feature_difference(hidden, reference)
        print(f"  {name:20s}: {rate:7.1f} slices/s, {rate * flops / 1e12 / peak:5.1%} of matmul rate, "
              f"difference from eager: RMS {difference['rms_relative']:.2g} of its RMS, max {difference['max_abs']:.3g} "
              f"(within the bf16 tolerance: {features_match(hidden, reference, torch.bfloat16)})")

    rate_of("eager", model)
    cache_rope_tables(model)
    rate_of("RoPE tables cached", model)
    rate_of("compiled", compiled(model, None))
    torch.cuda.empty_cache()


def compile_times(cache: Path, batch: int) -> None:
    for label in ("cold (empty cache)", "warm (same cache, new process)"):
        out = subprocess.run([sys.executable, "-c", COMPILE_PROBE, str(cache), str(batch)], capture_output=True,
                             text=True, cwd=REPO, check=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        print(f"  compile + first forward, {label}: {r['seconds']:.1f} s (cache hits {r['hits']}, misses {r['misses']})")


def disk_write_gbps(directory: Path, gigabytes: float = 4.0) -> float:
    block = os.urandom(64 * 2**20)
    path = directory / "disk_write_probe"
    started = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(int(gigabytes * 1e9 / len(block))):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - started
    written = path.stat().st_size
    path.unlink()
    return written / seconds / 1e9


def volumes_per_hour(layout: str, k: int, batch: int, cache: Path, tmp: Path, disk_gbps: float) -> None:
    out = tmp / f"cache_{layout}"
    command = [sys.executable, str(REPO / "preprocess_volume.py"), "--volume-index", f"0-{k - 1}", "--output-dir", str(out),
               "--source", "synthetic", "--model-id", "random:vitl16", "--batch-size", str(batch), "--compile",
               "--compile-cache", str(cache), "--layout", layout]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        print(f"  layout {layout}: not measured (exit {result.returncode}: {result.stderr.strip().splitlines()[-1:]})")
        return
    volume_bytes = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / k
    write_bound = 3600 * disk_gbps * 1e9 / volume_bytes
    print(f"  layout {layout}: {k} volumes in {wall:.1f} s (one process) = {3600 * k / wall:,.0f} volumes per GPU-hour; "
          f"{volume_bytes / 1e9:.2f} GB per volume, plain disk writes allow {write_bound:,.0f} volumes/hour")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layouts", nargs="+", default=["dense", "tokens"])
    parser.add_argument("--volumes-per-job", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workdir", default=None, help="where the caches are written (default: a temporary directory)")
    args = parser.parse_args(argv)
    peak = gpu_baseline()
    if peak is None:
        return 0
    from transformers import DINOv3ViTConfig

    from dinov3_cache.extraction.weights import RANDOM_MODEL_PRESETS

    config = DINOv3ViTConfig(patch_size=16, **RANDOM_MODEL_PRESETS["vitl16"])
    flops = vit_flops_per_slice(config, 1 + config.num_register_tokens + (512 // 16) ** 2)
    print(f"ViT-L/16 at 512^2, bf16, batch {args.batch_size}:")
    forward_rates(args.batch_size, flops, peak)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        cache = Path(tmp) / "compile_cache"
        compile_times(cache, args.batch_size)
        disk = disk_write_gbps(Path(tmp))
        print(f"plain disk writes (64 MiB blocks, fsync) in {tmp}: {disk:.2f} GB/s")
        print(f"end to end at seed geometry, K = {args.volumes_per_job} volumes per process:")
        for layout in args.layouts:
            volumes_per_hour(layout, args.volumes_per_job, args.batch_size, cache, Path(tmp), disk)
    return 0


if __name__ == "__main__":
    sys.exit(main())
