"""Caches the loader benchmarks read, built once by the real extraction CLI and then reused.

- "c1024": C=1024 (random:vitl16-1layer, ViT-L width), 64^3 label voxels, float16, default
  chunks (256,16,16,16): 537 MB of features per volume. Whole-volume reads, prefetch, GPU.
- "c1024-yx": "c1024" with chunks spanning the volume's y and x, (256,16,64,64): each channel of
  a chunk lands in the batch as one 32 KiB run, which the loader reads straight into it.
- "c256x128": C=256 (a 1-layer random DINOv3 of width 256 saved like a checkpoint), 128^3,
  default chunks: 1.07 GB per volume. Random 64^3 crops need room to move; with C a multiple
  of 256 every crop reads whole channel chunks, so the bytes ratio is that of any such C.
- "c256x128-yx": "c256x128" with chunks (256,16,128,128), spanning y and x (crops read more bytes).
- "tiny": C=192 (random:tiny), 16^3: the --smoke runs, which check a benchmark's code paths on
  a CPU in seconds and measure nothing.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from dinov3_cache.commit_protocol import committed_volume_indices

REPO = Path(__file__).resolve().parents[1]

DEFAULT_ROOT = Path("/tmp/dinov3_loader_bench")


def model_256(root: Path) -> Path:
    path = root / "model-256"
    if not (path / "config.json").is_file():
        import torch
        from transformers import DINOv3ViTConfig, DINOv3ViTModel

        torch.manual_seed(0)
        config = DINOv3ViTConfig(patch_size=16, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                                 num_attention_heads=4, num_register_tokens=4)
        DINOv3ViTModel(config).save_pretrained(path)
    return path


def extraction_args(kind: str, root: Path) -> list[str]:
    if kind == "c1024":
        return ["--model-id", "random:vitl16-1layer", "--output-image-dim", "64"]
    if kind == "c1024-yx":
        return [*extraction_args("c1024", root), "--chunks", "256,16,64,64"]
    if kind == "c256x128":
        return ["--model-id", str(model_256(root)), "--output-image-dim", "128", "--min-resolution-for-raw", "64"]
    if kind == "c256x128-yx":
        return [*extraction_args("c256x128", root), "--chunks", "256,16,128,128"]
    if kind == "tiny":
        return ["--model-id", "random:tiny", "--output-image-dim", "16"]
    raise ValueError(kind)


def ensure_cache(kind: str, volumes: int, cache: Path | None = None, root: Path = DEFAULT_ROOT, device: str = "auto") -> Path:
    """The cache directory with at least `volumes` committed volumes, building the missing ones."""
    out = cache or root / kind
    have = set(committed_volume_indices(out))
    for index in range(volumes):
        if index in have:
            continue
        print(f"building {kind} volume {index} in {out} (once; later runs reuse it) ...", file=sys.stderr, flush=True)
        started = time.perf_counter()
        subprocess.run(
            [sys.executable, str(REPO / "preprocess_volume.py"), "--volume-index", str(index), "--output-dir", str(out),
             "--source", "synthetic", "--device", device, *extraction_args(kind, root)],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        print(f"  built in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    return out
