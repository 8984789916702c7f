#!/usr/bin/env python
"""GPU extraction throughput: ViT-L/16 on 512 x 512 slices in bf16.

    python -m benchmarks.bench_gpu_extraction [--batch-sizes 16 32 64] [--volume]

Measures, in one run on one GPU:
  1. the card's bf16 matmul rate (8192^3 products): the baseline;
  2. the forward pass of a ViT-L/16 (random weights: the architecture sets the cost) over
     512 x 512 slices: slices/s and the fraction of the matmul rate it reaches, with bf16
     autocast and with bf16 weights (the pipeline's mode);
  3. with --volume, one seed-sized volume end to end (3 planes x 128 slices of 512^2,
     features 1024 x 128^3 float16 written to a temporary cache): seconds per volume
     against the bare forward time of the same 384 slices.
On a machine without CUDA it says so and exits 0.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

from benchmarks.bench_common import host_seconds


def device_time(fn, repeats: int, warmup: int = 2, device: str = "cuda", summary=statistics.median) -> float:
    """Seconds per call after warm-up, summarised over repeats (median by default): timed with
    CUDA events on a GPU, with the host clock elsewhere (the --smoke runs on a CPU)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    once = event_seconds if torch.device(device).type == "cuda" else host_seconds
    return summary([once(fn) for _ in range(repeats)])


def event_seconds(fn) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3


def synchronize(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def device_name(device: str | torch.device) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({os.cpu_count()} cores)"


def matmul_tflops(n: int = 8192, device: str = "cuda") -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    seconds = device_time(lambda: a @ b, repeats=10, warmup=3, device=device)
    return 2 * n**3 / seconds / 1e12


def vit_flops_per_slice(config, tokens: int) -> float:
    """Multiply-adds x 2 of one forward: QKV/output projections, attention, MLP, patch embedding."""
    d, f, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    per_layer = 2 * tokens * (4 * d * d + 2 * d * f) + 2 * 2 * tokens * tokens * d
    patch = 2 * (tokens - 1 - config.num_register_tokens) * (3 * config.patch_size**2) * d
    return layers * per_layer + patch


def forward_rate(model, batch: int, size: int, autocast: bool) -> float:
    x = torch.randn(batch, 3, size, size, device="cuda")
    if not autocast:
        x = x.to(torch.bfloat16)

    @torch.inference_mode()
    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            model(pixel_values=x)

    return batch / device_time(step, repeats=5)


def profile_forward(model, batch: int) -> None:
    """Where the forward's GPU time goes: the top kernels of one bf16 batch."""
    from torch.profiler import ProfilerActivity, profile

    x = torch.randn(batch, 3, 512, 512, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        model(pixel_values=x)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            model(pixel_values=x)
            torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))


def compiled_rate(model, batch: int, flops: float, peak: float) -> None:
    started = time.perf_counter()
    compiled = torch.compile(model)
    x = torch.randn(batch, 3, 512, 512, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        compiled(pixel_values=x)
    torch.cuda.synchronize()
    compile_seconds = time.perf_counter() - started

    @torch.inference_mode()
    def step():
        compiled(pixel_values=x)

    rate = batch / device_time(step, repeats=5)
    print(f"  torch.compile bf16 batch {batch}: {rate:7.1f} slices/s, {rate * flops / 1e12 / peak:5.1%} of matmul rate, "
          f"first call (compilation) {compile_seconds:.0f} s")


def bench_volume(batch_size: int) -> None:
    from benchmarks.bench_common import FixedSource
    from dinov3_cache.extraction.model import load_model
    from dinov3_cache.extraction.pipeline import preprocess_volume
    from dinov3_cache.extraction.settings import ExtractionSettings
    from dinov3_cache.sources.base import CropGeometry, SamplingOptions
    from dinov3_cache.sources.synthetic import SyntheticSource

    loaded = load_model("random:vitl16", device="cuda")
    geometry = CropGeometry()
    crop = SyntheticSource().sample(0, geometry, SamplingOptions())
    with tempfile.TemporaryDirectory() as tmp:
        walls = []
        for repeat in range(2):
            config = ExtractionSettings(output_dir=tmp, model_id="random:vitl16", batch_size=batch_size,
                                        device="cuda").config(repeat)
            torch.cuda.synchronize()
            started = time.perf_counter()
            outcome = preprocess_volume(config, FixedSource(crop), loaded)
            walls.append(time.perf_counter() - started)
        timing = outcome.metadata.timing
    x = torch.randn(batch_size, 3, 512, 512, device="cuda", dtype=loaded.compute_dtype)

    @torch.inference_mode()
    def forwards():
        for _ in range(384 // batch_size):
            loaded.model(pixel_values=x)

    bare = device_time(forwards, repeats=2, warmup=1)
    wall = min(walls)
    print(f"volume (1024 x 128^3 float16, 3 planes x 128 slices of 512^2): {wall:.2f} s per volume "
          f"(runs: {', '.join(f'{w:.2f}' for w in walls)}); bare forward of the same 384 slices {bare:.2f} s; "
          f"ratio {wall / bare:.2f}")
    print(f"  last run's metadata timing: {timing}")


def gpu_baseline(device: str = "cuda", n: int = 8192) -> float | None:
    """The device and its measured bf16 matmul rate (TFLOP/s), printed; None when CUDA is asked
    for and there is no GPU."""
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU on this machine: nothing to measure (run this on a GPU machine)")
        return None
    print(f"device: {device_name(device)}, torch {torch.__version__}")
    peak = matmul_tflops(n, device)
    print(f"bf16 matmul {n}^3: {peak:,.1f} TFLOP/s (baseline)")
    return peak


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--volume", action="store_true", help="also time one seed-sized volume end to end")
    parser.add_argument("--profile", action="store_true", help="print the top GPU kernels of one forward")
    parser.add_argument("--compile", action="store_true", help="also time the forward under torch.compile")
    args = parser.parse_args()
    peak = gpu_baseline()
    if peak is None:
        return 0
    from dinov3_cache.extraction.model import build_random_model

    model, _ = build_random_model("random:vitl16")
    model = model.cuda().eval()
    tokens = 1 + model.config.num_register_tokens + (512 // 16) ** 2
    flops = vit_flops_per_slice(model.config, tokens)
    print(f"ViT-L/16 at 512^2: {tokens} tokens, {flops / 1e12:.3f} TFLOP per slice")
    for mode in ("autocast", "bf16 weights"):
        m = model if mode == "autocast" else model.to(torch.bfloat16)
        for batch in args.batch_sizes:
            rate = forward_rate(m, batch, 512, autocast=mode == "autocast")
            print(f"  {mode:12s} batch {batch:3d}: {rate:7.1f} slices/s, {rate * flops / 1e12:6.0f} TFLOP/s, "
                  f"{rate * flops / 1e12 / peak:5.1%} of matmul rate")
    if args.profile:
        profile_forward(model, 32)
    if args.compile:
        compiled_rate(model, max(args.batch_sizes), flops, peak)
    del model
    torch.cuda.empty_cache()
    if args.volume:
        bench_volume(max(args.batch_sizes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
