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
On a machine without CUDA it says so and exits 0. --smoke runs every step on the CPU at toy
sizes (random:tiny, 64^2 slices, batch 2, K = 2, output 16^3; host-clock timing), so a broken
script shows without a GPU; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.bench_gpu_extraction import device_time, gpu_baseline, vit_flops_per_slice
from dinov3_cache.errors import named_first_line

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Scale:
    """What a run measures on: the GPU at seed geometry, or --smoke's toy sizes on the CPU."""

    device: str
    model_id: str
    slice_size: int
    matmul_n: int
    disk_gigabytes: float
    batch_size: int
    volumes_per_job: int
    output_image_dim: int | None = None  # None: preprocess_volume.py's default, the seed geometry

    @property
    def geometry(self) -> str:
        return "seed geometry" if self.output_image_dim is None else f"output {self.output_image_dim}^3"

    def extraction_args(self) -> list[str]:
        extra = [] if self.output_image_dim is None else ["--output-image-dim", str(self.output_image_dim)]
        return ["--device", self.device, "--model-id", self.model_id, *extra]


GPU = Scale("cuda", "random:vitl16", slice_size=512, matmul_n=8192, disk_gigabytes=4.0, batch_size=32, volumes_per_job=8)
SMOKE = Scale("cpu", "random:tiny", slice_size=64, matmul_n=256, disk_gigabytes=0.05, batch_size=2, volumes_per_job=2,
              output_image_dim=16)

COMPILE_PROBE = """
import json, sys, time, torch
from benchmarks.bench_gpu_extraction import synchronize
from dinov3_cache.extraction.model import ExecutionOptions, compile_cache_counts, load_model
cache, model_id, device, batch, size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
loaded = load_model(model_id, device=device, execution=ExecutionOptions(compile=True, compile_cache=cache))
x = torch.randn(batch, 3, size, size, device=device, dtype=loaded.compute_dtype)
started = time.perf_counter()
with torch.inference_mode():
    loaded.model(pixel_values=x)
synchronize(device)
print(json.dumps({"seconds": time.perf_counter() - started, **compile_cache_counts()}))
"""


def forward_rates(scale: Scale, batch: int, peak: float) -> None:
    from dinov3_cache.extraction.model import build_random_model, cache_rope_tables, compiled, feature_difference, features_match

    model, _ = build_random_model(scale.model_id)
    model = model.to(scale.device, torch.bfloat16).eval()
    config, size = model.config, scale.slice_size
    flops = vit_flops_per_slice(config, 1 + config.num_register_tokens + (size // config.patch_size) ** 2)
    print(f"{scale.model_id} ({config.num_hidden_layers} layers, width {config.hidden_size}) at {size}^2, bf16, batch {batch}:")
    x = torch.randn(batch, 3, size, size, device=scale.device, dtype=torch.bfloat16)

    with torch.inference_mode():
        reference = model(pixel_values=x).last_hidden_state

    def rate_of(name: str, m: torch.nn.Module) -> None:
        @torch.inference_mode()
        def step():
            return m(pixel_values=x)

        try:  # one failed execution (a compiler error, say) leaves the other figures of the run
            rate = batch / device_time(step, repeats=5, warmup=2, device=scale.device)
        except Exception as e:
            print(f"  {name:20s}: not measured ({named_first_line(e)})")
            return
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


def compile_times(scale: Scale, cache: Path, batch: int) -> None:
    probe = [sys.executable, "-c", COMPILE_PROBE, str(cache), scale.model_id, scale.device, str(batch), str(scale.slice_size)]
    for label in ("cold (empty cache)", "warm (same cache, new process)"):
        result = subprocess.run(probe, capture_output=True, text=True, cwd=REPO)
        if result.returncode != 0:
            print(f"  compile + first forward, {label}: not measured ({failure(result)})")
            continue
        r = json.loads(result.stdout.strip().splitlines()[-1])
        print(f"  compile + first forward, {label}: {r['seconds']:.1f} s (cache hits {r['hits']}, misses {r['misses']})")


def disk_write_gbps(directory: Path, gigabytes: float) -> float:
    block = os.urandom(64 * 2**20)
    path = directory / "disk_write_probe"
    started = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(max(1, int(gigabytes * 1e9 / len(block)))):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - started
    written = path.stat().st_size
    path.unlink()
    return written / seconds / 1e9


def failure(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}: {result.stderr.strip().splitlines()[-1:]}"


def volumes_per_hour(scale: Scale, layout: str, k: int, batch: int, cache: Path, tmp: Path, disk_gbps: float) -> None:
    out = tmp / f"cache_{layout}"
    command = [sys.executable, str(REPO / "preprocess_volume.py"), "--volume-index", f"0-{k - 1}", "--output-dir", str(out),
               "--source", "synthetic", *scale.extraction_args(), "--batch-size", str(batch), "--compile",
               "--compile-cache", str(cache), "--layout", layout]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        print(f"  layout {layout}: not measured ({failure(result)})")
        return
    volume_bytes = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / k
    shutil.rmtree(out)  # K dense seed volumes are 34 GB: room for the next layout's
    write_bound = 3600 * disk_gbps * 1e9 / volume_bytes
    print(f"  layout {layout}: {k} volumes in {wall:.1f} s (one process) = {3600 * k / wall:,.0f} volumes per GPU-hour; "
          f"{volume_bytes / 1e9:.2f} GB per volume, plain disk writes allow {write_bound:,.0f} volumes/hour")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layouts", nargs="+", default=["dense", "tokens"])
    parser.add_argument("--volumes-per-job", type=int, default=None, help=f"K (default {GPU.volumes_per_job})")
    parser.add_argument("--batch-size", type=int, default=None, help=f"default {GPU.batch_size}")
    parser.add_argument("--workdir", default=None, help="where the caches are written (default: a temporary directory)")
    parser.add_argument("--smoke", action="store_true", help="every step on the CPU at toy sizes: checks the script, measures nothing")
    args = parser.parse_args(argv)
    scale = SMOKE if args.smoke else GPU
    batch, k = args.batch_size or scale.batch_size, args.volumes_per_job or scale.volumes_per_job
    peak = gpu_baseline(scale.device, scale.matmul_n)
    if peak is None:
        return 0
    forward_rates(scale, batch, peak)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        cache = Path(tmp) / "compile_cache"
        compile_times(scale, cache, batch)
        disk = disk_write_gbps(Path(tmp), scale.disk_gigabytes)
        print(f"plain disk writes (64 MiB blocks, fsync) in {tmp}: {disk:.2f} GB/s")
        print(f"end to end at {scale.geometry}, K = {k} volumes per process:")
        for layout in args.layouts:
            volumes_per_hour(scale, layout, k, batch, cache, Path(tmp), disk)
    return 0


if __name__ == "__main__":
    sys.exit(main())
