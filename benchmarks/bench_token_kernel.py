"""The token kernel alone (storage/token_kernel.py): features built from in-memory token grids,
no reading, for a whole volume and a 64^3 crop, at several tile sizes (TILE_BYTES), each against
the kernel at its default tile size in the same run, and the default against the definition
(`features_from_tokens`). Random float16 tokens, C = 256, 128^3 features from 32^2 grids (512^2
slices, the seed geometry; --grid-size 16 is that of the loader benchmarks' cache), three planes;
float32 delivered into one reused output.

    python -m benchmarks.bench_token_kernel                 # tile sizes 1, 2, 4, 8, 16 MB; 1 and 2 threads
    python -m benchmarks.bench_token_kernel --smoke         # tiny sizes: checks the script, measures nothing
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from dinov3_cache.storage import token_kernel
from dinov3_cache.storage.planes import PLANE_AXES
from dinov3_cache.storage.upsampling import features_from_tokens, token_window


def crop_tokens(full: dict, grid_size: int, out_dim: int, region: list[tuple[int, int]]) -> tuple[dict, dict]:
    """The token windows of `region` (what the loader reads for a crop) and their origins."""
    grids, origins = {}, {}
    for plane, tokens in full.items():
        normal, image_axes = PLANE_AXES[plane]
        (a0, a1), (b0, b1) = (token_window(grid_size, out_dim, *region[axis]) for axis in image_axes)
        grids[plane] = tokens[:, region[normal][0]:region[normal][1], a0:a1, b0:b1].contiguous()
        origins[plane] = (a0, b0)
    return grids, origins


def best_seconds(fn, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--out-dim", type=int, default=128)
    parser.add_argument("--grid-size", type=int, default=32)
    parser.add_argument("--crop", type=int, default=64)
    parser.add_argument("--tiles-mb", default="1,2,4,8,16", help="tile sizes to compare, MB")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the fastest counts")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    if args.smoke:
        args.channels, args.out_dim, args.grid_size, args.crop, args.rounds = 8, 32, 8, 16, 1
    default = token_kernel.TILE_BYTES
    tiles = sorted({int(float(mb) * 2**20) for mb in args.tiles_mb.split(",")} | {default})
    torch.manual_seed(0)
    c, d, g, n = args.channels, args.out_dim, args.grid_size, args.crop
    full = {plane: torch.randn(c, d, g, g).half() for plane in ("xy", "xz", "yz")}
    start = (d - n) // 3  # not chunk- or token-aligned
    region = [(start, start + n)] * 3
    items = {"whole volume": (full, {}, [(0, d)] * 3, torch.empty(c, d, d, d)),
             f"{n}^3 crop": (*crop_tokens(full, g, d, region), region, torch.empty(c, n, n, n))}
    print(f"C={c}, {d}^3 from {g}^2 grids, float16 tokens, float32 delivered; {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}; default TILE_BYTES {default >> 20} MB; rounds {args.rounds}")
    before = torch.get_num_threads()
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        for item, (grids, origins, reg, out) in items.items():
            print(f"\n{item}, {threads} thread(s): {out.numel() * 4 / 1e9:.2f} GB delivered")
            compare_tiles(grids, origins, reg, out, d, g, tiles, args.rounds)
    torch.set_num_threads(before)


def compare_tiles(grids: dict, origins: dict, region: list, out: torch.Tensor, out_dim: int, grid_size: int,
                  tiles: list[int], rounds: int) -> None:
    """Print the kernel's time at each tile size, against the default's and the definition's."""
    default = token_kernel.TILE_BYTES

    def kernel(tile_bytes: int) -> None:
        token_kernel.TILE_BYTES = tile_bytes
        token_kernel.fast_features_from_tokens(grids, out_dim, region, grid_size, origins, out=out)

    seconds = dict.fromkeys(tiles, float("inf"))
    try:
        for _ in range(rounds):  # tile sizes interleaved: the machine's noise hits all alike
            for tile in tiles:
                seconds[tile] = min(seconds[tile], best_seconds(lambda tile=tile: kernel(tile), 1))
    finally:
        token_kernel.TILE_BYTES = default
    # once: the definition takes 10-20 s on a whole volume here
    reference = best_seconds(lambda: features_from_tokens(grids, out_dim, region, grid_size, origins, out=out), 1)
    gb = out.numel() * 4 / 1e9
    print(f"  {'tile':>8}  {'ms':>8}  {'GB/s':>6}  time / default tile's")
    for tile in tiles:
        mark = "  (default)" if tile == default else ""
        print(f"  {tile / 2**20:6.2f} MB {seconds[tile] * 1e3:8.1f}  {gb / seconds[tile]:6.2f}  "
              f"{seconds[tile] / seconds[default]:.2f}{mark}")
    print(f"  definition (features_from_tokens, one run): {reference * 1e3:.1f} ms; "
          f"kernel at the default tile / definition, time: {seconds[default] / reference:.2f}")

if __name__ == "__main__":
    main()
